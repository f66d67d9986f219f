"""Layout planner: which (tp, sp, dp_shard, dp_replicate, activation checkpointing) fits, and roughly how fast.

Pure arithmetic on the model config: no process group, no GPU. `tools/plan.py` prints its ranking; docs/parallelism.md
shows its output and explains the layouts. The numbers are estimates from a model, not measurements. It assumes:

Tokens. Wan's causal VAE maps `frames` video frames to 1 + (frames - 1) / 4 latent frames, and space by 16 for a
48-channel latent (Wan2.2-TI2V-5B's VAE) or by 8 otherwise (Wan2.1's 16-channel VAE); the preset's patch gives the
video tokens. Motion is 51 tokens per frame, `motion_frames` defaulting to `frames`. Under Ulysses each modality is
padded to a multiple of sp. One timestep per sample and modality (the trainer's tasks): modulation stays [B, 1, dim].

Parameters, gradients, optimizer (per GPU, the most loaded rank). The inventory mirrors `EchoMotionDiT` tensor by
tensor (tests/unit/test_plan.py checks it). TP splits the expert linears (q/k/v/ffn.0 by rows, o/ffn.2 by columns) and
the q/k RMSNorm weights; the rest is replicated over TP. FSDP2 shards dim 0 of every TP-local tensor over the
dp_shard x sp ranks, padded to a multiple of that size (a [1, 6, dim] modulation table costs a full copy per rank).
Sharded master weights, gradients and both AdamW moments are fp32 whatever `param_dtype` is (FSDP2 keeps sharded
tensors in their own dtype; `param_dtype` sets the gathered copy), plus AdamW's 4-byte `step` per tensor: 16 bytes per
parameter. All parameters are trainable (Phase 2). With FSDP on, "params" adds the gathered copies in `param_dtype` (the
root module, not resharded after the forward, and two blocks: the running and the prefetched one) and "grads" the
unsharded gradients in `param_dtype` (the root's and one block's).

Activations (per GPU). What autograd saves, tallied from the model's ops (see `Saved`): per token, expert and layer, by
whether a tensor has the full width (residual stream, fp32 norm inputs and outputs, modulated linear inputs,
row-parallel outputs), width / tp (column-parallel outputs, attention q/k/v/out), ffn_dim / tp, heads / tp (the fp32
log-sum-exp) or is a per-token scalar (norm statistics); RoPE rotations per token without a batch axis; cross-attention
k/v per text token. bf16 means `train.precision=bf16` (autocast): Wan's norms and modulation stay fp32, so the residual
stream is fp32, each column-parallel linear saves its own bf16 copy of its input, and over fp32 weights (no FSDP, or
param_dtype fp32) autocast's bf16 copy of every matmul weight is kept for the backward too. Attention is flash-style (no
L x L tensor). Under Ulysses a rank holds 1/sp of each modality's tokens in the blocks; text, embeddings and output heads
are full-size on every rank (tokens are sliced after the embeddings and gathered before the heads). Checkpointing keeps
each checkpointed block's input residual stream(s) and, in the backward, the recomputed activations of one block;
`every_k` checkpoints blocks 0, k, 2k, ... (parallel/activation.py). Not modelled: CUDA context, NCCL buffers,
allocator fragmentation and backward temporaries, left to `reserve_gib`.

Step time = compute + exposed communication, one micro-batch per data-parallel rank (no gradient accumulation).
- compute: `echomotion.models.flops.training_flops` per sample (3x forward) plus one forward of each checkpointed block,
  over tp x sp GPUs at `peak_flops x mfu` (an assumed utilization).
- FSDP: all-gather of parameters (param_dtype) in the forward and again in the backward, reduce-scatter of gradients
  (reduce_dtype), each moving (n - 1) / n of the TP-local parameters per GPU; HSDP adds a ring all-reduce of the
  sharded gradients across replicas. Prefetch overlaps it with compute: exposed = what exceeds compute, plus one layer's
  share (the first gather and the last reduce-scatter cannot overlap).
- Ulysses: per joint self-attention 4 all-to-alls (q, k, v, out) forward, 4 backward, 4 more when recomputed, each
  sending (sp - 1) / sp of the local [B, L/sp, heads/tp, head_dim] tensor (q, k in fp32 unless the weights are bf16);
  plus the all-gather before the heads and its reduce-scatter in the backward (fp32). Fully exposed.
- TP: per expert and layer 3 ring all-reduces of [B, L/sp, dim] forward (self-attention o, cross-attention o, ffn.2),
  5 backward (the input gradient of each column-parallel linear: q, k, v, cross q, ffn.0) plus 2 of the text's
  [B, L_text, dim] (cross k, cross v), and the forward ones again when recomputed; the [B, L, 1] RMSNorm reductions are
  ignored. Fully exposed. (Counted on gloo with parallel/comm.py: one tp 2 layer moves 3 + 5 token-sized and 2
  text-sized all-reduces per step, besides the norms.)
- A group inside one node moves data at `intra_bw` (NVLink, per direction per GPU), one spanning nodes at `inter_bw`
  (per GPU) for the whole transfer; latency is ignored. Mesh order (dp_replicate, dp_shard, sp, tp), tp innermost: a
  group spans nodes when its stride x size exceeds `gpus_per_node`.
Infeasible layouts (heads not divisible by tp x sp, tp not dividing dim / ffn_dim or beyond a node, memory above
`mem_gib - reserve_gib`) are kept with their reasons.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from echomotion.config import ModelConfig, dual_layer_indices
from echomotion.models.echomotion import Task
from echomotion.models.flops import forward_flops, training_flops
from echomotion.motion.smpl import (
    MOTION_FEATURE_DIM,
    MOTION_TOKENS_PER_FRAME,
    NUM_POS_TOKENS,
    NUM_ROT_TOKENS,
    POS_DIM,
    ROT_DIM,
    SHAPE_DIM,
)

from .activation import AC_MODES, checkpointed_blocks
from .mesh import Layout

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


class PlanError(ValueError):
    """An input the planner cannot work with; the message says which and why."""


# ------------------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Hardware:
    """One GPU kind and its interconnect. Defaults: H100 SXM (bf16 dense peak), 8 per node, 400 Gb/s IB per GPU."""

    mem_gib: float = 80.0
    peak_flops: float = 989e12
    mfu: float = 0.4  # assumed fraction of peak the executed FLOPs reach
    gpus_per_node: int = 8
    intra_bw: float = 450e9  # bytes/s per direction per GPU over NVLink
    inter_bw: float = 50e9  # bytes/s per GPU between nodes
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, fragmentation, backward temporaries


@dataclass(frozen=True)
class Workload:
    """One training sample's size and how a step runs. `precision` is the compute dtype (train.precision)."""

    frames: int
    height: int
    width: int
    motion_frames: Optional[int] = None  # None = frames
    text_len: Optional[int] = None  # None = model.text_len
    micro_batch: int = 1  # samples per data-parallel rank (one TP x SP group) per step
    precision: str = "bf16"
    param_dtype: str = "bf16"  # FSDP2's gathered parameters
    reduce_dtype: str = "fp32"  # FSDP2's gradient reduce-scatter
    ac_every: int = 2


@dataclass(frozen=True)
class Candidate(Layout):
    """One layout the planner weighs: the mesh degrees plus the activation checkpointing mode."""

    ac: str = "none"


@dataclass
class Memory:
    """Per-GPU bytes of the most loaded rank."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


@dataclass
class StepTime:
    compute: float
    fsdp: float  # total FSDP/HSDP communication time (mostly overlapped)
    ulysses: float
    tp: float
    exposed_fsdp: float

    @property
    def total(self) -> float:
        return self.compute + self.exposed_fsdp + self.ulysses + self.tp


@dataclass
class Estimate:
    layout: Candidate
    memory: Memory
    time: StepTime
    tokens_per_step: int  # video + motion tokens of the global batch (no padding)
    flops_per_step: float  # model training FLOPs of the global batch (no recompute), for MFU
    reasons: dict[str, str] = field(default_factory=dict)  # why it cannot run, by kind (heads, tp, node, memory)

    @property
    def feasible(self) -> bool:
        return not self.reasons

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total

    def mfu(self, hw: Hardware) -> float:
        return self.flops_per_step / self.time.total / (self.layout.world * hw.peak_flops)


# ------------------------------------------------------------------------------------------------------------ tokens
def vae_stride(m: ModelConfig) -> tuple[int, int]:
    """(temporal, spatial) compression of the VAE whose latents the preset reads: Wan2.2's 48-channel VAE is 16x in
    space, Wan2.1's 16-channel one 8x; both 4x in time (causal: the first frame alone)."""
    return 4, (16 if m.in_channels == 48 else 8)


def latent_grid(m: ModelConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Video token grid (F, H, W) after the VAE and the patch; errors name the constraint."""
    t_stride, s_stride = vae_stride(m)
    if frames < 1 or (frames - 1) % t_stride:
        raise PlanError(f"frames={frames}: Wan's causal VAE needs 1 + {t_stride}k frames (e.g. 81, 121)")
    pt, ph, pw = m.patch_size
    latent_f = 1 + (frames - 1) // t_stride
    for name, pixels, p in (("height", height, ph), ("width", width, pw)):
        if pixels < 1 or pixels % (s_stride * p):
            raise PlanError(
                f"{name}={pixels} must be a positive multiple of {s_stride * p} (VAE stride {s_stride} x patch {p})"
            )
    if latent_f % pt:
        raise PlanError(f"{latent_f} latent frames are not divisible by the temporal patch {pt}")
    return latent_f // pt, height // s_stride // ph, width // s_stride // pw


def token_counts(m: ModelConfig, w: Workload) -> tuple[int, int, int]:
    """(video, motion, text) tokens of one sample."""
    f, h, wd = latent_grid(m, w.frames, w.height, w.width)
    motion_frames = w.frames if w.motion_frames is None else w.motion_frames
    if motion_frames < 0:
        raise PlanError(f"motion_frames={motion_frames} must be >= 0")
    text = m.text_len if w.text_len is None else w.text_len
    return f * h * wd, motion_frames * MOTION_TOKENS_PER_FRAME, text


# -------------------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamTensor:
    """One parameter: its shape, the dim TP splits (None = replicated over TP), and its block (None = root module)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: Optional[int] = None
    block: Optional[int] = None
    autocast: bool = False  # a matmul weight that bf16 autocast copies (and autograd then keeps) in every forward

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int) -> tuple[int, ...]:
        if self.tp_dim is None:
            return self.shape
        s = list(self.shape)
        s[self.tp_dim] //= tp
        return tuple(s)

    def shard_numel(self, tp: int, shard: int) -> int:
        """Elements on the most loaded rank: TP split, then FSDP2's dim-0 shard padded to a multiple of `shard`."""
        s = self.local_shape(tp)
        return math.ceil(s[0] / shard) * math.prod(s[1:])


def _linear(
    name: str, d_in: int, d_out: int, style: Optional[str] = None, block: Optional[int] = None, autocast: bool = True
) -> list[ParamTensor]:
    """nn.Linear's weight [out, in] and bias [out]; "col" splits both by rows, "row" splits the weight by columns."""
    return [
        ParamTensor(f"{name}.weight", (d_out, d_in), {"col": 0, "row": 1}.get(style or ""), block, autocast),
        ParamTensor(f"{name}.bias", (d_out,), 0 if style == "col" else None, block),
    ]


def _mlp(name: str, d_in: int, hidden: int, d_out: int) -> list[ParamTensor]:
    return _linear(f"{name}.0", d_in, hidden) + _linear(f"{name}.2", hidden, d_out)


def _expert(prefix: str, m: ModelConfig, block: int) -> list[ParamTensor]:
    """A `WanBlock`: self- and cross-attention (q/k/v column-, o row-parallel, TP-sharded q/k norms), norm3 (affine),
    FFN, modulation table."""
    d = m.dim
    out: list[ParamTensor] = []
    for attn in ("self_attn", "cross_attn"):
        for proj in ("q", "k", "v"):
            out += _linear(f"{prefix}{attn}.{proj}", d, d, "col", block)
        out += _linear(f"{prefix}{attn}.o", d, d, "row", block)
        out += [ParamTensor(f"{prefix}{attn}.norm_{n}.weight", (d,), 0, block) for n in ("q", "k")]
    out += [ParamTensor(f"{prefix}norm3.{n}", (d,), None, block) for n in ("weight", "bias")]
    out += _linear(f"{prefix}ffn.0", d, m.ffn_dim, "col", block) + _linear(f"{prefix}ffn.2", m.ffn_dim, d, "row", block)
    out.append(ParamTensor(f"{prefix}modulation", (1, 6, d), None, block))
    return out


def parameter_inventory(m: ModelConfig) -> list[ParamTensor]:
    """Every parameter of `EchoMotionDiT(m)`, in no particular order."""
    d, pt = m.dim, math.prod(m.patch_size)
    hidden = m.motion.mlp_hidden or d
    dual = set(dual_layer_indices(m))
    out = [
        ParamTensor("patch_embedding.weight", (d, m.in_channels, *m.patch_size), autocast=True),
        ParamTensor("patch_embedding.bias", (d,)),
        *_linear("text_embedding.0", m.text_dim, d),
        *_linear("text_embedding.2", d, d),
        # the time embedding runs with autocast off (wan.time_conditioning)
        *_linear("time_embedding.0", m.freq_dim, d, autocast=False),
        *_linear("time_embedding.2", d, d, autocast=False),
        *_linear("time_projection.1", d, 6 * d, autocast=False),
        *_linear("head.head", d, m.out_channels * pt),
        ParamTensor("head.modulation", (1, 2, d)),
        ParamTensor("motion_head.modulation", (1, 2, d)),
    ]
    for group, dim in (("pos", POS_DIM), ("rot", ROT_DIM), ("shape", SHAPE_DIM)):
        out += _mlp(f"motion_embed.{group}", dim, hidden, d) + _mlp(f"motion_head.{group}", d, hidden, dim)
    if m.task_hint:
        out += [ParamTensor("task_hint.embedding.weight", (len(Task), d)), *_mlp("task_hint.mlp", d, d, d)]
    for i in range(m.num_layers):
        out += _expert(f"blocks.{i}.", m, i)
        if i in dual:
            out += _expert(f"blocks.{i}.motion.", m, i)
    return out


def parameter_count(m: ModelConfig) -> int:
    return sum(p.numel for p in parameter_inventory(m))


def state_bytes(m: ModelConfig, layout: Candidate, w: Workload) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per GPU; see the module docstring."""
    inv = parameter_inventory(m)
    sharded = sum(p.shard_numel(layout.tp, layout.shard_group) for p in inv)
    params, grads, optimizer = 4.0 * sharded, 4.0 * sharded, 8.0 * sharded + 4.0 * len(inv)
    if layout.fsdp:
        pb = DTYPE_BYTES[w.param_dtype]
        local = _local_numel_by_block(inv, layout.tp)
        root = local.pop(None, 0)
        largest = max(local.values(), default=0)
        params += pb * (root + 2 * largest)
        grads += pb * (root + largest)
    return params, grads, optimizer


def _local_numel_by_block(inv: list[ParamTensor], tp: int) -> dict[Optional[int], int]:
    out: dict[Optional[int], int] = {}
    for p in inv:
        out[p.block] = out.get(p.block, 0) + math.prod(p.local_shape(tp))
    return out


# ------------------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Saved:
    """Bytes autograd keeps, per token of one expert in one layer, by how the tensor's size scales.

    Counted from the ops of `WanBlock` and the joint attention (echomotion/models/wan.py, echomotion.py):
    - full width: norm1 input and output, modulated q/k/v input (fp32: one tensor; bf16: autocast's three bf16 copies),
      self-attention o output, norm3 input, its output (cross q input), norm2 input and output, modulated ffn.0 input,
      ffn.2 output (fp32: 10 x 4 B; bf16: 4+4+6+2+4+2+4+4+2+2 = 34 B);
    - width / tp: q and k before their RMSNorm and after it (fp32 copies under bf16), the joint attention's q/k/v/out,
      cross q before and after its norm, cross q as attended, cross out (fp32: 12 x 4 B; bf16: 30 B);
    - ffn_dim / tp: ffn.0 output and GELU output; heads / tp: both attentions' fp32 log-sum-exp;
    - per token: mean and rstd of three LayerNorms, rstd of three RMSNorms (9 x 4 B);
    - per token without a batch axis: the q and k RoPE rotations (complex64, head_dim / 2 each);
    - per text token: cross k before and after its norm, k and v as attended (width / tp), k's rstd.
    A dual layer's o input is a view of the attention output, except with a batch > 1, when splitting [video; motion]
    makes it a copy (`split_copy`).
    """

    full: int
    split: int
    ffn: int
    heads: int
    scalar: int
    rope: int
    text_split: int
    text_scalar: int
    split_copy: int


SAVED = {
    "fp32": Saved(full=40, split=48, ffn=8, heads=8, scalar=36, rope=8, text_split=16, text_scalar=4, split_copy=4),
    "bf16": Saved(full=34, split=30, ffn=4, heads=8, scalar=36, rope=8, text_split=10, text_scalar=4, split_copy=2),
}


@dataclass
class Activations:
    """Saved bytes after the forward (`saved`) and the extra held while one checkpointed block is recomputed."""

    saved: float
    recompute: float

    @property
    def peak(self) -> float:
        return self.saved + self.recompute


def layer_streams(m: ModelConfig, video: int, motion: int) -> list[list[int]]:
    """Per layer, the token counts of the streams it runs an expert for (video first)."""
    dual = set(dual_layer_indices(m))
    return [[s for s in ([video] + ([motion] if i in dual else [])) if s > 0] for i in range(m.num_layers)]


def activation_bytes(m: ModelConfig, w: Workload, layout: Candidate) -> Activations:
    """Activation memory of one GPU for one micro-batch (see `Saved` and the module docstring).

    With bf16 autocast over fp32 weights (no FSDP, or FSDP with param_dtype fp32), autocast's bf16 copy of every matmul
    weight is kept for the backward too; FSDP2 with param_dtype bf16 frees its gathered weights after each block instead.
    """
    if w.precision not in SAVED:
        raise PlanError(f"precision={w.precision!r}: choose one of {', '.join(SAVED)}")
    s, a = SAVED[w.precision], DTYPE_BYTES[w.precision]
    b, d, heads, tp = w.micro_batch, m.dim, m.num_heads, layout.tp
    hd = d // heads
    video, motion, text = token_counts(m, w)
    per_token = s.full * d + (s.split * d + s.ffn * m.ffn_dim + s.heads * heads) / tp + s.scalar
    text_expert = b * text * (s.text_split * d / tp + s.text_scalar)
    casts = _weight_casts(m, tp) if w.precision == "bf16" and not (layout.fsdp and w.param_dtype == "bf16") else {}

    def block_full(i: int, streams: list[int]) -> float:
        tokens = sum(streams)
        copy = s.split_copy * d / tp * tokens if len(streams) > 1 and b > 1 else 0
        return b * (tokens * per_token + copy) + tokens * s.rope * hd + len(streams) * text_expert + casts.get(i, 0)

    def block_inputs(i: int, streams: list[int]) -> float:
        # the residual stream is fp32 after the first modulated residual add; block 0 gets the embeddings' dtype
        return b * sum(streams) * d * (a if i == 0 else 4)

    streams = layer_streams(m, *(math.ceil(n / layout.sp) for n in (video, motion)))
    ckpt = set(checkpointed_blocks(m.num_layers, layout.ac, w.ac_every))
    blocks = sum(block_inputs(i, st) if i in ckpt else block_full(i, st) for i, st in enumerate(streams))
    recompute = max((block_full(i, streams[i]) for i in ckpt), default=0.0)
    return Activations(blocks + casts.get(None, 0) + _outside_blocks(m, w, video, motion, text), recompute)


def _weight_casts(m: ModelConfig, tp: int) -> dict[Optional[int], float]:
    """Bytes of autocast's bf16 weight copies per block (None = root module)."""
    out: dict[Optional[int], float] = {}
    for p in parameter_inventory(m):
        if p.autocast:
            out[p.block] = out.get(p.block, 0) + 2 * math.prod(p.local_shape(tp))
    return out


def _outside_blocks(m: ModelConfig, w: Workload, video: int, motion: int, text: int) -> float:
    """Embeddings and heads, full-size on every rank: text MLP (input, GELU in/out, context), patch-embedding input,
    video head (norm in/out, modulated input), motion tokenizer (feature slices, SiLU in/out) and decoder."""
    a, b, d = DTYPE_BYTES[w.precision], w.micro_batch, m.dim
    hidden = m.motion.mlp_hidden or d
    total = b * text * a * (m.text_dim + 3 * d)
    total += b * video * (a * m.in_channels * math.prod(m.patch_size) + (8 + a) * d + 8)
    if motion:
        frames = motion / MOTION_TOKENS_PER_FRAME
        total += b * frames * a * MOTION_FEATURE_DIM + b * motion * 2 * a * hidden
        # decoder: norm in/out (fp32), its input to the three MLPs (fp32: the modulated tensor, kept whole by the shape
        # token's view, plus copies for the position and rotation groups; bf16: one bf16 copy), SiLU in/out
        grouped = (NUM_POS_TOKENS + NUM_ROT_TOKENS) / MOTION_TOKENS_PER_FRAME
        head_in = 4 * d * (1 + grouped) if w.precision == "fp32" else 2 * d
        total += b * motion * (8 * d + 8 + head_in + 2 * a * hidden)
    return total


# ----------------------------------------------------------------------------------------------------------- time
def layer_forward_flops(m: ModelConfig, video: int, motion: int, text: int) -> list[float]:
    """Forward FLOPs of each block for one sample, from `echomotion.models.flops.forward_flops` (a one-layer model minus
    a zero-layer one, so embeddings and heads cancel)."""
    def flops(layers: int, dual: str) -> float:
        return forward_flops(dataclasses.replace(m, num_layers=layers, dual_layers=dual), video, motion, text)

    base = flops(0, "none")
    one = {dual: flops(1, "0" if dual else "none") - base for dual in (False, True)}
    dual_layers = set(dual_layer_indices(m))
    return [one[i in dual_layers] for i in range(m.num_layers)]


def _bandwidth(hw: Hardware, span: int) -> float:
    """A group whose ranks lie within `span` consecutive ranks talks over NVLink if that fits in one node."""
    return hw.intra_bw if span <= hw.gpus_per_node else hw.inter_bw


def step_time(m: ModelConfig, w: Workload, layout: Candidate, hw: Hardware) -> StepTime:
    """Compute and communication of one optimizer step (see the module docstring for the model)."""
    video, motion, text = token_counts(m, w)
    b, d, tp, sp, a = w.micro_batch, m.dim, layout.tp, layout.sp, DTYPE_BYTES[w.precision]
    ckpt = checkpointed_blocks(m.num_layers, layout.ac, w.ac_every)
    recompute = sum(layer_forward_flops(m, video, motion, text)[i] for i in ckpt)
    flops = b * (training_flops(m, video, motion, text) + recompute) / (tp * sp)
    compute = flops / (hw.peak_flops * hw.mfu)

    fsdp = 0.0
    if layout.fsdp:
        by_block = _local_numel_by_block(parameter_inventory(m), tp)
        local, root = sum(by_block.values()), by_block.get(None, 0)
        n = layout.shard_group
        frac = (n - 1) / n
        gathered = frac * (2 * local - root) * DTYPE_BYTES[w.param_dtype]  # forward + backward (blocks reshard)
        reduced = frac * local * DTYPE_BYTES[w.reduce_dtype]
        fsdp = (gathered + reduced) / _bandwidth(hw, n * tp)
        r = layout.dp_replicate
        if r > 1:
            fsdp += 2 * (r - 1) / r * local / n * DTYPE_BYTES[w.reduce_dtype] / _bandwidth(hw, layout.world)
    exposed = max(fsdp - compute, 0.0) + fsdp / m.num_layers if fsdp else 0.0

    streams = layer_streams(m, *(math.ceil(n / sp) for n in (video, motion)))
    ulysses = 0.0
    if sp > 1:
        bw = _bandwidth(hw, sp * tp)
        # q and k leave RoPE in fp32 unless the weights themselves are bf16 (FSDP2 param_dtype); v and out are `a` wide
        qk = 2 if w.precision == "bf16" and layout.fsdp and w.param_dtype == "bf16" else 4
        for i, st in enumerate(streams):
            passes = 3 if i in ckpt else 2  # forward, backward, recompute
            ulysses += passes * (sp - 1) / sp * b * sum(st) * d / tp * (2 * qk + 2 * a) / bw
        # gather before the heads and its reduce-scatter (fp32 residual), each modality
        ulysses += 2 * (sp - 1) / sp * b * (video + motion) * d * 4 / bw
    tp_time = 0.0
    if tp > 1:
        ring = 2 * (tp - 1) / tp / _bandwidth(hw, tp)
        for i, st in enumerate(streams):
            for tokens in st:
                count = 3 + 5 + (3 if i in ckpt else 0)  # forward, backward, recomputed forward
                tp_time += ring * (count * b * tokens * d + 2 * b * text * d) * a
    return StepTime(compute, fsdp, ulysses, tp_time, exposed)


# ------------------------------------------------------------------------------------------------------- planning
def estimate(m: ModelConfig, w: Workload, layout: Candidate, hw: Hardware) -> Estimate:
    """Memory and step time of one layout, with the reasons it cannot run (if any)."""
    reasons = {}
    if m.num_heads % (layout.tp * layout.sp):
        reasons["heads"] = f"num_heads={m.num_heads} is not divisible by tp x sp = {layout.tp * layout.sp}"
    if m.dim % layout.tp or m.ffn_dim % layout.tp:
        reasons["tp"] = f"tp={layout.tp} does not divide dim={m.dim} and ffn_dim={m.ffn_dim}"
    if layout.tp > hw.gpus_per_node or hw.gpus_per_node % layout.tp:
        reasons["node"] = f"tp={layout.tp} does not fit within a node of {hw.gpus_per_node} GPUs"
    params, grads, optimizer = state_bytes(m, layout, w)
    acts = activation_bytes(m, w, layout)
    memory = Memory(params, grads, optimizer, acts.peak)
    usable = (hw.mem_gib - hw.reserve_gib) * GIB
    if memory.total > usable:
        reasons["memory"] = f"needs {memory.total / GIB:.1f} GiB per GPU; {usable / GIB:.1f} GiB usable"
    video, motion, text = token_counts(m, w)
    dp_samples = w.micro_batch * layout.dp
    return Estimate(
        layout,
        memory,
        step_time(m, w, layout, hw),
        tokens_per_step=dp_samples * (video + motion),
        flops_per_step=dp_samples * training_flops(m, video, motion, text),
        reasons=reasons,
    )


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(gpus: int, ac_modes: tuple[str, ...] = AC_MODES) -> list[Candidate]:
    """Every (tp, sp, dp_shard, dp_replicate, AC) whose degrees multiply to `gpus`."""
    return [
        Candidate(dp_replicate=rep, dp_shard=dp // rep, sp=sp, tp=tp, ac=ac)
        for tp in divisors(gpus)
        for sp in divisors(gpus // tp)
        for dp in [gpus // (tp * sp)]
        for rep in divisors(dp)
        for ac in ac_modes
    ]


def plan(m: ModelConfig, gpus: int, w: Workload, hw: Hardware = Hardware()) -> list[Estimate]:
    """Every layout for `gpus`: feasible ones first, fastest first (ties: less memory), then the infeasible ones."""
    check_inputs(m, gpus, w, hw)
    found = [estimate(m, w, layout, hw) for layout in layouts(gpus)]
    return sorted(found, key=lambda e: (not e.feasible, e.time.total, e.memory.total))


def check_inputs(m: ModelConfig, gpus: int, w: Workload, hw: Hardware) -> None:
    """Clear errors for inputs the model cannot mean."""
    if gpus < 1:
        raise PlanError(f"gpus={gpus} must be a positive number of GPUs")
    if w.micro_batch < 1 or w.ac_every < 1:
        raise PlanError(f"micro_batch={w.micro_batch} and ac_every={w.ac_every} must be >= 1")
    if w.text_len is not None and w.text_len < 1:
        raise PlanError(f"text_len={w.text_len} must be >= 1")
    for key in ("precision", "param_dtype", "reduce_dtype"):
        if getattr(w, key) not in DTYPE_BYTES:
            raise PlanError(f"{key}={getattr(w, key)!r}: choose one of {', '.join(DTYPE_BYTES)}")
    for key in ("mem_gib", "peak_flops", "intra_bw", "inter_bw", "gpus_per_node"):
        if getattr(hw, key) <= 0:
            raise PlanError(f"{key}={getattr(hw, key)} must be > 0")
    if not 0 < hw.mfu <= 1:
        raise PlanError(f"mfu={hw.mfu} must be in (0, 1]")
    if not 0 <= hw.reserve_gib < hw.mem_gib:
        raise PlanError(f"reserve_gib={hw.reserve_gib} must be >= 0 and below mem_gib={hw.mem_gib}")
    token_counts(m, w)
