"""Encoder/decoder architectures for disentanglement work. Needs torch only.

    model = build_model("conv", latents=10, channels=1)
    logits, mu, logvar, z = model(x)      # x: float NCHW in [0, 1]

`conv` is the net of Burgess et al. 2018 ("Understanding disentangling in beta-VAE") used by most
disentanglement papers for 64x64 images; `mlp` is the fully connected dSprites net of Chen et al.
2018 ("Isolating Sources of Disentanglement"). The decoder returns logits: apply a sigmoid for
pixel intensities. A deterministic model is a plain autoencoder: z = mu, logvar = 0.
"""
import torch
from torch import nn

ARCHS = ("conv", "mlp")


class Autoencoder(nn.Module):
    def __init__(self, encoder, decoder, latents, image_shape, deterministic):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latents, self.image_shape, self.deterministic = latents, image_shape, deterministic

    def encode(self, x):
        """x (B, C, H, W) -> posterior mean and log-variance, each (B, latents)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, (torch.zeros_like(mu) if self.deterministic else logvar)

    def decode(self, z):
        """z (B, latents) -> logits (B, C, H, W)."""
        out = self.decoder(z)
        return out if out.dim() == 4 else out.view(-1, *self.image_shape)

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu if self.deterministic else mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar, z


def conv_encoder(latents, channels):
    layers, width = [], channels
    for _ in range(4):  # 64 -> 32 -> 16 -> 8 -> 4
        layers += [nn.Conv2d(width, 32, 4, 2, 1), nn.ReLU()]
        width = 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2 * latents))


def conv_decoder(latents, channels):
    return nn.Sequential(
        nn.Linear(latents, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 32 * 4 * 4), nn.ReLU(), nn.Unflatten(1, (32, 4, 4)),
        nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, channels, 4, 2, 1))


def mlp_encoder(latents, pixels):
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, 1200), nn.ReLU(),
                         nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 2 * latents))


def mlp_decoder(latents, pixels):
    return nn.Sequential(nn.Linear(latents, 1200), nn.Tanh(), nn.Linear(1200, 1200), nn.Tanh(),
                         nn.Linear(1200, 1200), nn.Tanh(), nn.Linear(1200, pixels))


def build_model(arch="conv", latents=10, channels=1, size=64, deterministic=False):
    """The autoencoder `arch` ("conv" or "mlp") for size x size images with `channels` channels.

    The conv net is built for 64x64 only (four stride-2 layers down to 4x4); the MLP takes any size.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if latents < 1:
        raise ValueError(f"latents must be at least 1, got {latents}")
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    if arch == "conv" and size != 64:
        raise ValueError(f"the conv architecture needs 64x64 images, got {size}x{size}; "
                         "resize the data to 64x64 or use --arch mlp")
    if arch == "conv":
        encoder, decoder = conv_encoder(latents, channels), conv_decoder(latents, channels)
    else:
        pixels = channels * size * size
        encoder, decoder = mlp_encoder(latents, pixels), mlp_decoder(latents, pixels)
    return Autoencoder(encoder, decoder, latents, (channels, size, size), deterministic)
