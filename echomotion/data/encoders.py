"""Video codecs and text encoders that turn raw clips into the arrays stored in the shards.

Every video codec maps uint8 frames [B, T, H, W, 3] to float32 latents [B, C, F_lat, H_lat, W_lat] with Wan's causal
temporal structure (F_lat = 1 + (T - 1) / 4) and back. `PixelCodec` needs no weights (the CPU default, exact round trip);
`WanVAECodec` loads the real Wan VAE from a local diffusers folder. Text encoders return one true-length embedding
[L, dim] per prompt (callers pad), like Wan's umT5 context: `HashTextEncoder` is weight-free and deterministic,
`UMT5TextEncoder` loads umT5 from a local transformers folder. Nothing here downloads anything.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, BinaryIO, Protocol, Sequence

import numpy as np
import torch

__all__ = [
    "VideoCodec",
    "TextEncoder",
    "PixelCodec",
    "PCACodec",
    "PCA_CODEC_FILE",
    "video_codec_from",
    "WanVAECodec",
    "HashTextEncoder",
    "UMT5TextEncoder",
    "build_video_codec",
    "build_text_encoder",
    "text_encoder_from",
    "VIDEO_CODECS",
    "TEXT_ENCODERS",
]


class VideoCodec(Protocol):
    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> np.ndarray: ...

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...

    def describe(self) -> dict[str, Any]: ...


class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


def _check_frames(frames: np.ndarray | torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(frames)) if not torch.is_tensor(frames) else frames
    if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[-1] != 3:
        raise ValueError(f"video frames must be uint8 [B,T,H,W,3], got {x.dtype} {list(x.shape)}")
    t, h, w = x.shape[1:4]
    if (t - 1) % temporal != 0:
        raise ValueError(
            f"video has {t} frames; the codec needs 1 + {temporal}k frames (e.g. {1 + temporal * max(1, (t - 1) // temporal)})"
            " like Wan's causal VAE: resample or trim the clip"
        )
    if h % spatial or w % spatial:
        raise ValueError(f"frame size {h}x{w} must be divisible by the codec's spatial compression {spatial}")
    return x


class PixelCodec:
    """Weight-free stand-in for the Wan VAE: stacks frames in time and pixels in space, so latents keep Wan's layout.

    Latent frame 0 is video frame 0 repeated 4 times, latent frame j >= 1 holds video frames 4j-3..4j (the causal VAE's
    grouping), each frame space-to-depth by `spatial`, values scaled to [-1, 1]. Channels are ordered
    (frame-in-group, rgb, dy, dx). decode(encode(x)) == x exactly, also after a float16 round trip.
    """

    temporal_compression = 4

    def __init__(self, spatial: int = 2):
        if spatial < 1:
            raise ValueError(f"spatial compression must be >= 1, got {spatial}")
        self.spatial_compression = spatial
        self.latent_channels = self.temporal_compression * 3 * spatial * spatial

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.spatial_compression
        return self.latent_channels, 1 + (num_frames - 1) // self.temporal_compression, height // s, width // s

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = _check_frames(frames, self.temporal_compression, self.spatial_compression)
        b, _, h, w, _ = x.shape
        k, s = self.temporal_compression, self.spatial_compression
        x = torch.cat([x[:, :1].expand(-1, k, -1, -1, -1), x[:, 1:]], dim=1)  # [B, 4*F_lat, H, W, 3]
        x = x.reshape(b, -1, k, h // s, s, w // s, s, 3)  # b f k hh dy ww dx c
        x = x.permute(0, 2, 7, 4, 6, 1, 3, 5).reshape(b, self.latent_channels, -1, h // s, w // s)
        return x.float() / 127.5 - 1.0

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """Latent -> uint8 frames; the 4 copies of frame 0 are averaged (exact for encoded data, robust for generated)."""
        z = latent.detach().float().cpu()
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B,{self.latent_channels},F,H,W], got {list(z.shape)}")
        b, _, f, hh, ww = z.shape
        k, s = self.temporal_compression, self.spatial_compression
        x = z.reshape(b, k, 3, s, s, f, hh, ww).permute(0, 5, 1, 6, 3, 7, 4, 2)  # b f k hh dy ww dx c
        x = x.reshape(b, f, k, hh * s, ww * s, 3)
        video = torch.cat([x[:, :1].mean(2), x[:, 1:].flatten(1, 2)], dim=1)
        return ((video + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()

    def describe(self) -> dict[str, Any]:
        return {"name": "pixel", "spatial": self.spatial_compression, "latent_channels": self.latent_channels}


class PCACodec:
    """The pixel codec's tokens projected on their top principal components, each scaled to unit variance: a compressing,
    weight-light stand-in for the Wan VAE, fitted on a dataset's own frames when it is written (HuMoVe-mini).

    Why: a pixel-codec token carries 48 values (4 frames x RGB x 2 x 2), nearly the toy model's whole width (64), so the
    model cannot keep its input apart from what it computes and passes input noise through to its prediction (grainy
    samples). Wan's VAE compresses 48x (16 channels for 4 x 8 x 8 x RGB) and normalizes each channel; this does the same
    at toy scale: 16 components keep 99.8% of HuMoVe-mini's token variance (mean decoding error about 1 of 255 levels).
    Measured in docs/PERFORMANCE.md. The mean, basis and scales live in one small file next to the shards.
    """

    temporal_compression = PixelCodec.temporal_compression

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, std: torch.Tensor, spatial: int = 2):
        self.pixel = PixelCodec(spatial)
        if basis.dim() != 2 or basis.shape[1] != self.pixel.latent_channels or mean.shape != (basis.shape[1],) \
                or std.shape != (basis.shape[0],):
            raise ValueError(f"a PCA codec over {self.pixel.latent_channels} pixel values needs mean [{basis.shape[-1]}], "
                             f"basis [k, {self.pixel.latent_channels}] and std [k]; got {list(mean.shape)}, "
                             f"{list(basis.shape)}, {list(std.shape)}")
        self.mean, self.basis, self.std = mean.float(), basis.float(), std.float()
        self.spatial_compression = spatial
        self.latent_channels = basis.shape[0]

    @classmethod
    def fit(cls, frames: np.ndarray | torch.Tensor, channels: int, spatial: int = 2) -> "PCACodec":
        """Principal components of the pixel-codec tokens of `frames` (uint8 [B, T, H, W, 3])."""
        pixel = PixelCodec(spatial)
        if not 1 <= channels <= pixel.latent_channels:
            raise ValueError(f"a PCA codec keeps 1..{pixel.latent_channels} components, got {channels}")
        tokens = pixel.encode(frames).movedim(1, -1).reshape(-1, pixel.latent_channels).double()
        mean = tokens.mean(0)
        _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
        basis = vh[:channels]
        std = ((tokens - mean) @ basis.T).std(0).clamp_min(1e-6)
        return cls(mean.float(), basis.float(), std.float(), spatial)

    @classmethod
    def load(cls, path: str | Path) -> "PCACodec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a 'pca' dataset keeps its codec there (tools/make_humove_mini.py "
                                    "writes it); copy it with the shards")
        return cls.read(path)

    @classmethod
    def read(cls, src: str | Path | BinaryIO) -> "PCACodec":
        """From a file or its bytes (an export carries the codec file inside it)."""
        d = torch.load(src, weights_only=True)
        return cls(d["mean"], d["basis"], d["std"], int(d["spatial"]))

    def save(self, path: str | Path) -> None:
        torch.save({"mean": self.mean, "basis": self.basis, "std": self.std, "spatial": self.spatial_compression}, path)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.latent_channels, *self.pixel.latent_shape(num_frames, height, width)[1:])

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        tokens = self.pixel.encode(frames).movedim(1, -1)
        return (((tokens - self.mean) @ self.basis.T) / self.std).movedim(-1, 1)

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        z = latent.detach().float().cpu()
        if z.dim() != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B,{self.latent_channels},F,H,W], got {list(z.shape)}")
        tokens = (z.movedim(1, -1) * self.std) @ self.basis + self.mean
        return self.pixel.decode(tokens.movedim(-1, 1))

    def describe(self) -> dict[str, Any]:
        return {"name": "pca", "spatial": self.spatial_compression, "latent_channels": self.latent_channels,
                "file": PCA_CODEC_FILE}


PCA_CODEC_FILE = "video_codec.pt"


class WanVAECodec:
    """The Wan VAE (`diffusers.AutoencoderKLWan`) from a local folder, latents normalized with its config's mean/std.

    Encoding takes the posterior mean (no sampling noise), as Wan's own pipeline does; the normalization
    (z - latents_mean) / latents_std is what Wan's DiT was trained on.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKLWan

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no diffusers VAE at {str(path)!r} (expected config.json + weights). Point --vae-path at the `vae` "
                "folder of a diffusers Wan checkpoint, e.g. Wan2.1-T2V-1.3B-Diffusers/vae, downloaded beforehand."
            )
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype).to(self.device).eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.z_dim)
        self.temporal_compression = int(cfg.scale_factor_temporal or 4)
        self.spatial_compression = int(cfg.scale_factor_spatial or 8)
        shape = (1, self.latent_channels, 1, 1, 1)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.spatial_compression
        return self.latent_channels, 1 + (num_frames - 1) // self.temporal_compression, height // s, width // s

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = _check_frames(frames, self.temporal_compression, self.spatial_compression)
        x = x.permute(0, 4, 1, 2, 3).to(self.device, self.dtype) / 127.5 - 1.0  # [B,3,T,H,W] in [-1,1]
        z = self.vae.encode(x).latent_dist.mode().float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        z = latent.detach().float().cpu() * self.std + self.mean
        video = self.vae.decode(z.to(self.device, self.dtype)).sample.float().cpu()  # [B,3,T,H,W]
        video = ((video.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return video.permute(0, 2, 3, 4, 1).numpy()

    def describe(self) -> dict[str, Any]:
        return {"name": "wan-vae", "path": str(self.path), "latent_channels": self.latent_channels,
                "temporal": self.temporal_compression, "spatial": self.spatial_compression}


_WORD = re.compile(r"[a-z0-9']+")


class HashTextEncoder:
    """Weight-free deterministic text encoder: one fixed pseudo-random vector per lowercase word, plus its next word's vector
    turned by a fixed rotation (times `context`), plus position.

    A word's vector is seeded from sha256(seed, word), so it is the same on every machine and Python run (python's
    hash() is salted per process). The next-word term is a one-word stand-in for the context umT5 gives each token: in
    "a red shirt and blue trousers ... on a green background" a token must say which colour goes where, and a bag of
    context-free words cannot (measured in docs/PERFORMANCE.md: t2vm background accuracy 0.10 without it, 0.75 with
    `context=1`). A small sinusoidal position term keeps word order visible. The empty prompt gives a [0, dim] tensor.
    `context=0` is the encoder of datasets written before the term existed (their dataset.json records no "context").
    """

    def __init__(self, dim: int = 32, seed: int = 0, position_scale: float = 0.1, context: float = 1.0):
        if dim < 2:
            raise ValueError(f"text dim must be >= 2, got {dim}")
        self.dim, self.seed, self.position_scale, self.context = dim, seed, position_scale, context
        self._cache: dict[str, np.ndarray] = {}
        rng = np.random.default_rng([seed, 11])
        self._next_word_map = np.linalg.qr(rng.standard_normal((dim, dim)))[0]  # a fixed random rotation

    def _word(self, word: str) -> np.ndarray:
        v = self._cache.get(word)
        if v is None:
            digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            v = self._cache[word] = rng.standard_normal(self.dim)
        return v

    def _positions(self, n: int) -> np.ndarray:
        half = self.dim // 2
        freq = np.exp(-math.log(100.0) * np.arange(half) / half)
        ang = np.arange(n)[:, None] * freq[None]
        pe = np.zeros((n, self.dim))
        pe[:, 0 : 2 * half : 2], pe[:, 1 : 2 * half : 2] = np.sin(ang), np.cos(ang)
        return pe * self.position_scale

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for text in texts:
            words = _WORD.findall(text.lower())
            if not words:
                out.append(torch.zeros(0, self.dim))
                continue
            vecs = np.stack([self._word(w) for w in words])
            nxt = np.concatenate([vecs[1:], np.zeros((1, self.dim))]) @ self._next_word_map.T
            emb = vecs + self.context * nxt + self._positions(len(words))
            out.append(torch.from_numpy(emb.astype(np.float32)))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": "hash", "dim": self.dim, "seed": self.seed, "position_scale": self.position_scale,
                "context": self.context}


def umt5_folders(path: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder): one transformers folder holding both, or a diffusers Wan pipeline folder with
    `text_encoder/` and `tokenizer/` (as the Wan-AI *-Diffusers repositories ship them)."""
    if (path / "config.json").is_file():
        return path, path
    if (path / "text_encoder" / "config.json").is_file() and (path / "tokenizer").is_dir():
        return path / "text_encoder", path / "tokenizer"
    raise FileNotFoundError(
        f"no transformers umT5 encoder at {str(path)!r} (expected config.json, weights and tokenizer files, or a diffusers "
        "pipeline folder with text_encoder/ and tokenizer/). Point --text-encoder-path at a local folder holding "
        "UMT5EncoderModel weights and the umT5 tokenizer, e.g. the Wan2.1-T2V-1.3B-Diffusers download."
    )


class UMT5TextEncoder:
    """Wan's text encoder (umT5-XXL encoder) from a local transformers or diffusers pipeline folder, returning
    true-length embeddings.

    Like Wan, prompts are tokenized with the end-of-sequence token and truncated at max_length; the embedding keeps
    the real tokens only (padding is masked inside the encoder, so it does not change them).
    """

    def __init__(self, path: str | Path, max_length: int = 512, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = Path(path).expanduser()
        model_dir, tokenizer_dir = umt5_folders(path)
        self.path, self.max_length, self.device = path, max_length, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.model = UMT5EncoderModel.from_pretrained(str(model_dir), torch_dtype=dtype).to(self.device).eval()
        self.dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        if not texts:
            return []
        tok = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                             add_special_tokens=True, return_attention_mask=True, return_token_type_ids=False,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
        return [h[: int(n)].clone() for h, n in zip(hidden, mask.sum(1))]

    def describe(self) -> dict[str, Any]:
        return {"name": "umt5", "path": str(self.path), "dim": self.dim, "max_length": self.max_length}


VIDEO_CODECS = ("pixel", "wan-vae")  # built by name; "pca" is fitted on the data (PCACodec.fit) and loaded from a file
TEXT_ENCODERS = ("hash", "umt5")


def build_video_codec(name: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> VideoCodec:
    """`pixel` (no weights) or `wan-vae` (needs the local diffusers VAE folder as `path`)."""
    if name == "pixel":
        return PixelCodec()
    if name == "wan-vae":
        if path is None:
            raise ValueError("video codec 'wan-vae' needs a path: pass --vae-path /path/to/Wan-Diffusers/vae")
        return WanVAECodec(path, device=device)
    raise ValueError(f"unknown video codec {name!r}; choose one of {list(VIDEO_CODECS)}")


def build_text_encoder(name: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> TextEncoder:
    """`hash` (no weights, 32-d) or `umt5` (needs the local transformers folder as `path`)."""
    if name == "hash":
        return HashTextEncoder()
    if name == "umt5":
        if path is None:
            raise ValueError("text encoder 'umt5' needs a path: pass --text-encoder-path /path/to/umt5")
        return UMT5TextEncoder(path, device=device)
    raise ValueError(f"unknown text encoder {name!r}; choose one of {list(TEXT_ENCODERS)}")


def video_codec_from(description: dict[str, Any], root: str | Path, vae_path: str | Path | None = None,
                     device: str | torch.device = "cpu") -> VideoCodec:
    """The codec a dataset was written with, from its dataset.json `video_codec` entry (`root`: the dataset folder, where a
    PCA codec's file lives; `vae_path`: where the Wan VAE is now, if it moved)."""
    name = description.get("name")
    if name == "pixel":
        return PixelCodec(int(description.get("spatial", 2)))
    if name == "pca":
        return PCACodec.load(Path(root) / description.get("file", PCA_CODEC_FILE))
    return build_video_codec(str(name), vae_path or description.get("path"), device)


def text_encoder_from(description: dict[str, Any], path: str | Path | None = None,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """The encoder a dataset was written with, from its dataset.json `text_encoder` entry, so new prompts are encoded
    exactly like its shards (a hash encoder's settings are all in the entry; umT5 needs its weights folder)."""
    if description.get("name") == "hash":
        return HashTextEncoder(dim=int(description.get("dim", 32)), seed=int(description.get("seed", 0)),
                               position_scale=float(description.get("position_scale", 0.1)),
                               context=float(description.get("context", 0.0)))
    return build_text_encoder(str(description.get("name")), path or description.get("path"), device)


def pad_text(embedding: torch.Tensor, length: int) -> torch.Tensor:
    """Text embeddings [..., L, D] -> [..., length, D], zero-padded or truncated, in their own dtype and device. Every
    consumer (the training batches, on the device; the null text, sampling, evaluation) pads this one way; Wan leaves the
    zero padding unmasked."""
    out = embedding.new_zeros(*embedding.shape[:-2], length, embedding.shape[-1])
    n = min(length, embedding.shape[-2])
    out[..., :n, :] = embedding[..., :n, :]
    return out

