"""Encoder/decoder architectures for disentanglement work, and FactorVAE's discriminator. Needs torch only.

    model = build_model("conv", latents=10, channels=1)
    logits, mu, logvar, z = model(x)      # x (B, C, 64, 64) float in [0, 1] -> logits (B, C, 64, 64),
                                          # mu, logvar, z (B, latents)
    discriminator = build_discriminator(latents=10)
    tc_logits = discriminator(z)          # (B, latents) -> (B, 2)

`conv` is the net of Burgess et al. 2018 ("Understanding disentangling in beta-VAE") used by most
disentanglement papers for 64x64 images; `mlp` is the fully connected dSprites net of Chen et al.
2018 ("Isolating Sources of Disentanglement"). The decoder returns logits: apply a sigmoid for
pixel intensities. A deterministic model is a plain autoencoder: z = mu, logvar = 0. The
discriminator is Kim & Mnih's 2018 ("Disentangling by Factorising"): losses.py has its loss and
train.py its optimizer step.
"""
import torch
from torch import nn

ARCHS = ("conv", "mlp")


class Autoencoder(nn.Module):
    """An encoder giving (B, 2 * latents): mu and logvar side by side, and a decoder giving logits."""

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

    def forward(self, x, noise=None):
        """x (B, C, H, W) -> logits (B, C, H, W), mu, logvar, z (each (B, latents)).

        z = mu + noise * exp(logvar / 2), the reparameterisation trick; `noise` (B, latents) is
        standard normal, drawn here unless given (a caller that splits one batch over processes
        passes its rows of the batch's noise, so every process draws what one process would).
        """
        mu, logvar = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mu)
        z = mu if self.deterministic else mu + noise * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar, z


def conv_encoder(latents, channels):
    """(B, channels, 64, 64) -> (B, 2 * latents): four 4x4 stride-2 convolutions of 32, then 256, 256."""
    layers, width = [], channels
    for _ in range(4):  # 64 -> 32 -> 16 -> 8 -> 4
        layers += [nn.Conv2d(width, 32, 4, 2, 1), nn.ReLU()]
        width = 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2 * latents))


def conv_decoder(latents, channels):
    """(B, latents) -> logits (B, channels, 64, 64): the encoder mirrored, transposed convolutions."""
    return nn.Sequential(
        nn.Linear(latents, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 32 * 4 * 4), nn.ReLU(), nn.Unflatten(1, (32, 4, 4)),
        nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.ConvTranspose2d(32, channels, 4, 2, 1))


def mlp_encoder(latents, pixels):
    """(B, C, H, W) with C * H * W = pixels -> (B, 2 * latents): 1200, 1200 ReLU units."""
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, 1200), nn.ReLU(),
                         nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 2 * latents))


def mlp_decoder(latents, pixels):
    """(B, latents) -> logits (B, pixels), reshaped by Autoencoder.decode: 1200, 1200, 1200 tanh units."""
    return nn.Sequential(nn.Linear(latents, 1200), nn.Tanh(), nn.Linear(1200, 1200), nn.Tanh(),
                         nn.Linear(1200, 1200), nn.Tanh(), nn.Linear(1200, pixels))


def build_model(arch="conv", latents=10, channels=1, size=64, deterministic=False):
    """The autoencoder `arch` ("conv" or "mlp") for size x size images with `channels` channels.

    Returns an Autoencoder: forward(x) maps x (B, channels, size, size) to (logits, mu, logvar,
    z), logits of x's shape and the others (B, latents); deterministic=True makes it a plain
    autoencoder (z = mu, logvar = 0). The conv net is built for 64x64 only (four stride-2 layers
    down to 4x4); the MLP takes any size. Raises ValueError for an unknown arch, latents < 1,
    channels other than 1 or 3, or a conv net with size other than 64.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if latents < 1:
        raise ValueError(f"latents must be at least 1, got {latents}")
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    if arch == "conv" and size != 64:
        raise ValueError(f"the conv architecture needs 64x64 images, got {size}x{size}; "
                         "resize the images to 64x64 or build arch='mlp'")
    if arch == "conv":
        encoder, decoder = conv_encoder(latents, channels), conv_decoder(latents, channels)
    else:
        pixels = channels * size * size
        encoder, decoder = mlp_encoder(latents, pixels), mlp_decoder(latents, pixels)
    return Autoencoder(encoder, decoder, latents, (channels, size, size), deterministic)


def build_discriminator(latents=10):
    """Kim & Mnih's (2018, Appendix A) FactorVAE discriminator: (B, latents) -> logits (B, 2).

    Six fully connected layers of 1000 units, each followed by LeakyReLU(0.2), then a linear
    layer to 2 logits: column 0 "a sample of q(z)", column 1 "a sample of prod_j q(z_j)" (the
    classes losses.discriminator_loss trains them to), so logits[:, 0] - logits[:, 1] estimates
    log q(z) / prod_j q(z_j). Raises ValueError for latents < 1.
    """
    if latents < 1:
        raise ValueError(f"latents must be at least 1, got {latents}")
    layers, width = [], latents
    for _ in range(6):
        layers += [nn.Linear(width, 1000), nn.LeakyReLU(0.2)]
        width = 1000
    return nn.Sequential(*layers, nn.Linear(1000, 2))
