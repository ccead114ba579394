"""DM-SR (issue 11): one-step SR that maps the LR image into a frozen diffusion model's noisy distribution."""
