"""The diffusion maths, written once, one module each:

- ``schedulers``: the noise schedule a model was trained with (DDPM family or rectified flow) and its samplers
  by name (diffusers' DDPM, DDIM, DPM-Solver++, Euler, UniPC, PNDM; MONAI's rectified flow).
- ``objective``: the forward process, the training target of each prediction (eps, v, x0), x0 from a prediction,
  and rectified flow's straight line and velocity.
- ``sampling``: the one sampling loop over a model function, with per-step hooks; a network as a model function.
- ``guidance``: classifier-free guidance as a wrapper of a model function (and the doubled batch it runs).
- ``tiling``: a model function evaluated on overlapping tiles (sliding-window inference).
- ``repaint``: RePaint inpainting as a sampling hook (the known region kept, resampling jumps).
- ``latent``: image to scaled latent and back (latent diffusion's autoencoder maps, tiled decoding).
- ``denoise``: noise-level-matched denoising of a scan (from the timestep whose noise matches the scan's).
- ``noise_level``: the noise level of a magnitude MR image, estimated from the image itself, and the timestep
  whose noise matches it.
- ``rician``: Rician bias correction of a denoised magnitude MR image.
- ``quality``: no-reference checks of a denoised image (noise before and after; whether the residual looks like
  noise).
"""
