"""Batch-wise augmentation with explicit, replayable parameters.

Parameters are sampled separately from their application so the same augmentation can be replayed later
(e.g. to look up cached teacher outputs for exactly the crop/flip the student saw).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache, partial

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    dx: torch.Tensor  # int64 (B,), crop offset in [0, 2*pad]
    dy: torch.Tensor  # int64 (B,)
    flip: torch.Tensor  # bool (B,)


@dataclass(frozen=True)
class CropFlip:
    """Random crop after zero padding (`pad` pixels per side) and optional horizontal flip."""

    pad: int
    hflip: bool

    def sample(self, n: int, generator: torch.Generator) -> AugmentParams:
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        return AugmentParams(dx, dy, flip)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """images: (B, C, H, W) any dtype. Returns the same shape."""
        b, _, h, w = images.shape
        if self.pad > 0:
            padded = F.pad(images, (self.pad,) * 4)
            # one slice copy per image: several times faster than a fancy-index gather at 32-64 px
            out = torch.empty_like(images)
            for i, (dy, dx) in enumerate(zip(params.dy.tolist(), params.dx.tolist())):
                out[i] = padded[i, :, dy : dy + h, dx : dx + w]
            images = out
        if params.flip.any():
            images = images.clone()
            images[params.flip] = images[params.flip].flip(-1)
        return images.contiguous()


# ---------------------------------------------------------------- replayable parameter trees

def map_params(params, fn):
    """`fn` applied to every tensor of a (nested) parameter dataclass; None stays None."""
    if params is None:
        return None
    if isinstance(params, torch.Tensor):
        return fn(params)
    return type(params)(**{f.name: map_params(getattr(params, f.name), fn) for f in fields(params)})


# ---------------------------------------------------------------- RandAugment on uint8 batches

# timm's "increasing" RandAugment set (Cubuk et al. 2020), without Invert/SolarizeAdd; magnitude M is in
# tenths of each op's maximum, as timm's rand-mM (M=9 is its default).
RANDAUG_OPS = ("identity", "autocontrast", "equalize", "posterize", "solarize", "color", "contrast", "brightness",
               "sharpness", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
MAX_ROTATE_DEG, MAX_SHEAR, MAX_TRANSLATE, MAX_ENHANCE = 30.0, 0.3, 0.45, 0.9


@dataclass(frozen=True)
class RandAugParams:
    ops: torch.Tensor  # int64 (B, N): indices into RANDAUG_OPS, applied in order
    sign: torch.Tensor  # float32 (B, N): +-1, the direction of signed ops


@dataclass(frozen=True)
class RandAugment:
    """N ops per image drawn uniformly from RANDAUG_OPS, each at magnitude M/10 of its maximum."""

    num_ops: int = 2
    magnitude: int = 9

    def sample(self, n: int, generator: torch.Generator) -> RandAugParams:
        ops = torch.randint(0, len(RANDAUG_OPS), (n, self.num_ops), generator=generator)
        sign = torch.where(torch.rand(n, self.num_ops, generator=generator) < 0.5, -1.0, 1.0)
        return RandAugParams(ops, sign)

    def apply(self, images: torch.Tensor, params: RandAugParams) -> torch.Tensor:
        """uint8 (B, C, H, W) -> uint8, every image with its own ops."""
        m = self.magnitude / 10.0
        out = images.clone()
        for j in range(self.num_ops):
            ops, sign = params.ops[:, j], params.sign[:, j]
            # each image has one op per slot, so the slot's geometric ops are one warp of all their images
            geometric = (ops >= _FIRST_GEOMETRIC).nonzero().flatten()
            if len(geometric):
                out[geometric] = _affine(out[geometric], _geometric_theta(ops[geometric], sign[geometric], m))
            present = torch.bincount(ops, minlength=len(RANDAUG_OPS)).tolist()
            for op_id, name in enumerate(RANDAUG_OPS[:_FIRST_GEOMETRIC]):
                if name == "identity" or present[op_id] == 0:
                    continue
                rows = (ops == op_id).nonzero().flatten()
                out[rows] = _OPS[name](out[rows], m, sign[rows])
        return out


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), per image factor, clamped to uint8."""
    x = images.float()
    y = degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _enhance_factor(m: float, sign: torch.Tensor) -> torch.Tensor:
    return 1.0 + sign * MAX_ENHANCE * m


def _autocontrast(images, m, sign):
    x = images.float()
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-6), torch.ones_like(hi))
    offset = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - offset) * scale).round_().clamp_(0, 255).to(torch.uint8)


def _equalize(images, m, sign):
    """Histogram equalisation of every image channel (cdf mapped onto 0..255)."""
    b, c, h, w = images.shape
    flat = images.reshape(b * c, h * w).long()
    offsets = torch.arange(b * c).view(-1, 1) * 256
    hist = torch.bincount((flat + offsets).flatten(), minlength=b * c * 256).view(b * c, 256)
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, h * w + 1)).amin(1, keepdim=True)
    denom = (h * w - cdf_min).clamp(min=1)
    lut = ((cdf - cdf_min).clamp(min=0).double() * 255 / denom).round().clamp(0, 255).to(torch.uint8)
    flat_lut = torch.where(denom > 0, lut, torch.arange(256, dtype=torch.uint8).expand(b * c, 256))
    constant = (cdf_min >= h * w)  # one grey level: leave the channel as it is
    out = torch.gather(flat_lut, 1, flat)
    out = torch.where(constant, flat.to(torch.uint8), out)
    return out.view(b, c, h, w)


def _posterize(images, m, sign):
    """Keep the 8 - int(4 M/10) most significant bits (stronger with M)."""
    shift = int(4 * m)
    return images & ((0xFF << shift) & 0xFF)


def _solarize(images, m, sign):
    threshold = int(round(256 - 256 * m))
    return torch.where(images >= threshold, 255 - images, images)


def _color(images, m, sign):
    return _blend(_grey(images.float()), images, _enhance_factor(m, sign))


def _contrast(images, m, sign):
    mean = _grey(images.float()).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean, images, _enhance_factor(m, sign))


def _brightness(images, m, sign):
    return _blend(torch.zeros(1), images, _enhance_factor(m, sign))


def _sharpness(images, m, sign):
    c = images.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = F.conv2d(F.pad(images.float(), (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
    return _blend(smooth, images, _enhance_factor(m, sign))


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-image affine warp (theta (B, 2, 3) maps output to input in normalised coordinates), bilinear, zero fill."""
    b, _, h, w = images.shape
    base = _base_grid(h, w)  # x' = t00 x + t01 y + t02, y' = t10 x + t11 y + t12, elementwise (a batched matmul is slower)
    x, y = base[..., 0].view(1, h, w), base[..., 1].view(1, h, w)
    t = theta.view(b, 6, 1, 1)
    grid = torch.stack([t[:, 0] * x + t[:, 1] * y + t[:, 2], t[:, 3] * x + t[:, 4] * y + t[:, 5]], dim=-1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@lru_cache(maxsize=8)
def _base_grid(h: int, w: int) -> torch.Tensor:
    """(H, W, 3) pixel centres in normalised coordinates with a ones column (what affine_grid builds per call)."""
    ys = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
    grid = torch.ones(h, w, 3)
    grid[..., 0] = xs.view(1, w)
    grid[..., 1] = ys.view(h, 1)
    return grid


def _geometric_theta(ops: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    """The warp of each image's geometric op (rotate, shear x/y, translate x/y) at magnitude m."""
    kind = [ops == RANDAUG_OPS.index(name) for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")]
    rotate, shear_x, shear_y, translate_x, translate_y = kind
    angle = torch.deg2rad(sign * MAX_ROTATE_DEG * m)
    cos, sin = torch.where(rotate, torch.cos(angle), 1.0), torch.where(rotate, torch.sin(angle), 0.0)
    zero = torch.zeros_like(sign)
    shear, shift = sign * MAX_SHEAR * m, sign * MAX_TRANSLATE * m * 2.0  # normalised coordinates span 2
    row0 = torch.stack([cos, torch.where(shear_x, shear, -sin), torch.where(translate_x, shift, zero)], 1)
    row1 = torch.stack([torch.where(shear_y, shear, sin), cos, torch.where(translate_y, shift, zero)], 1)
    return torch.stack([row0, row1], 1)


_OPS = {
    "autocontrast": _autocontrast, "equalize": _equalize, "posterize": _posterize, "solarize": _solarize,
    "color": _color, "contrast": _contrast, "brightness": _brightness, "sharpness": _sharpness,
}
_FIRST_GEOMETRIC = RANDAUG_OPS.index("rotate")  # ops from here on are warps


# ---------------------------------------------------------------- mixup / cutmix with recorded partners

@dataclass(frozen=True)
class MixParams:
    partner: torch.Tensor  # int64 (B,): dataset index of the image mixed in
    lam: torch.Tensor  # float32 (B,): weight of the image itself (1: not mixed); for cutmix 1 - patch area
    cut: torch.Tensor  # bool (B,): cutmix (a patch of the partner) rather than mixup (a blend)
    box: torch.Tensor  # int64 (B, 4): y0, y1, x0, x1 of the patch (cutmix rows)


@dataclass(frozen=True)
class Mix:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) per image, timm's parameterisation: with
    probability `prob` an image is mixed, by CutMix with probability `switch_prob` when both are on."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        from ..errors import EdgekdError

        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or self.mixup_alpha + self.cutmix_alpha == 0:
            raise EdgekdError(f"mixup_alpha ({self.mixup_alpha}) and cutmix_alpha ({self.cutmix_alpha}) must be >= 0 "
                              "and not both 0: e.g. --mixup 0.8 --cutmix 1.0")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EdgekdError(f"mix {name} must be in [0, 1], got {getattr(self, name)}")

    def sample(self, n: int, num_images: int, size: tuple[int, int], generator: torch.Generator) -> MixParams:
        partner = torch.randint(0, num_images, (n,), generator=generator)
        mixed = torch.rand(n, generator=generator) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = torch.rand(n, generator=generator) < self.switch_prob
        else:
            cut = torch.full((n,), self.cutmix_alpha > 0)
        # torch.distributions draws from the global RNG; Beta = X / (X + Y) with Gamma draws from `generator`
        lam_mixup = _beta(self.mixup_alpha, n, generator)
        lam_cut = _beta(self.cutmix_alpha, n, generator)
        h, w = size
        ratio = torch.sqrt(1.0 - lam_cut)
        cut_h, cut_w = (h * ratio).long(), (w * ratio).long()
        cy = torch.randint(0, h, (n,), generator=generator)
        cx = torch.randint(0, w, (n,), generator=generator)
        y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
        x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
        area = ((y1 - y0) * (x1 - x0)).float() / (h * w)
        lam = torch.where(cut, 1.0 - area, lam_mixup)
        lam = torch.where(mixed, lam, torch.ones(n))
        cut = cut & mixed
        box = torch.stack([y0, y1, x0, x1], 1) * cut[:, None]
        return MixParams(partner, lam.float(), cut, box)

    @staticmethod
    def apply(images: torch.Tensor, partners: torch.Tensor, params: MixParams) -> torch.Tensor:
        """float (B, C, H, W) images and their partners' (already augmented) -> the mixed float batch."""
        lam = params.lam.view(-1, 1, 1, 1)
        blend = lam * images + (1.0 - lam) * partners
        if not bool(params.cut.any()):
            return blend
        h, w = images.shape[-2:]
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        y0, y1, x0, x1 = (params.box[:, i].view(-1, 1, 1) for i in range(4))
        inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (B, H, W)
        patched = torch.where(inside[:, None], partners, images)
        return torch.where(params.cut.view(-1, 1, 1, 1), patched, blend)


def _beta(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    if alpha <= 0:
        return torch.ones(n)
    x = torch._standard_gamma(torch.full((n,), float(alpha)), generator=generator)
    y = torch._standard_gamma(torch.full((n,), float(alpha)), generator=generator)
    return x / (x + y).clamp(min=1e-12)


# ---------------------------------------------------------------- the whole view

@dataclass(frozen=True)
class ViewParams:
    """Everything that makes one training view of an image; stored per (image, variant) in a bank."""

    crop: AugmentParams
    ops: RandAugParams | None = None
    mix: MixParams | None = None
    partner_crop: AugmentParams | None = None
    partner_ops: RandAugParams | None = None


@dataclass(frozen=True)
class Augmentation:
    """RandAugment, then crop/flip, then mixup/cutmix with a partner that got its own RandAugment and crop."""

    crop: CropFlip
    randaug: RandAugment | None = None
    mix: Mix | None = None

    def sample(self, n: int, num_images: int, size: tuple[int, int], generator: torch.Generator) -> ViewParams:
        crop = self.crop.sample(n, generator)  # first, so crop/flip alone draws exactly what CropFlip did
        ops = self.randaug.sample(n, generator) if self.randaug else None
        if self.mix is None:
            return ViewParams(crop, ops)
        mix = self.mix.sample(n, num_images, size, generator)
        partner_crop = self.crop.sample(n, generator)
        partner_ops = self.randaug.sample(n, generator) if self.randaug else None
        return ViewParams(crop, ops, mix, partner_crop, partner_ops)

    def one(self, images: torch.Tensor, crop: AugmentParams, ops: RandAugParams | None) -> torch.Tensor:
        if ops is not None:
            images = self.randaug.apply(images, ops)
        return self.crop.apply(images, crop)

    def apply(self, get_batch, index: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """float (B, C, H, W) in 0..255 for the images at `index` (get_batch: indices -> uint8 images)."""
        own = self.one(get_batch(index), params.crop, params.ops).float()
        if params.mix is None:
            return own
        mixed = (params.mix.lam < 1.0).nonzero().flatten()
        if len(mixed) == 0:
            return own
        take = partial(_rows, rows=mixed)
        partners = self.one(get_batch(params.mix.partner[mixed]), map_params(params.partner_crop, take),
                            map_params(params.partner_ops, take)).float()
        own[mixed] = self.mix.apply(own[mixed], partners, map_params(params.mix, take))
        return own


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return t[rows]
