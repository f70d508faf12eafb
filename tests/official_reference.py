"""An independent, functional rendering of the official TIM generator straight from an official-named state dict.

Written from the structure of the official release (DESIGN.md §2.3) without any of chimle's modules, so that the
converter test compares two separate implementations: names, concatenation orders, the [-1, 1] feedback of the
super-resolution tower and the colourization tower's last level all have to agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _conv(state, prefix, x):
    v, g, b = state[prefix + ".weight_v"], state[prefix + ".weight_g"], state[prefix + ".bias"]
    w = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return F.conv2d(x, w, b, padding=v.shape[-1] // 2)


def _lrelu(x):
    return F.leaky_relu(x, 0.2)


def _linear(state, prefix, x):
    return F.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])


def _rdb(state, prefix, x):
    feats = [x]
    for i in range(1, 5):
        feats.append(_lrelu(_conv(state, f"{prefix}.conv{i}.0", torch.cat(feats, 1))))
    return _conv(state, f"{prefix}.conv5.0", torch.cat(feats, 1)) * 0.2 + x


def _style(state, prefix, x, w):
    h = x
    i = 0
    while f"{prefix}.sub.transform_{i}.weight" in state:
        r = h
        for k in (1, 2, 3):
            r = _rdb(state, f"{prefix}.sub.{i}.RDB{k}", r)
        r = r * 0.2 + h
        t = _linear(state, f"{prefix}.sub.transform_{i}", w)
        c = r.shape[1]
        h = (1 + t[:, :c, None, None]) * F.instance_norm(r) + t[:, c:, None, None]
        i += 1
    return _conv(state, f"{prefix}.sub.lr_conv.0", h) + x


def _up(state, prefix, x, upsample):
    if upsample:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return _lrelu(_conv(state, f"{prefix}.3", _lrelu(_conv(state, f"{prefix}.1", x))))
    return _lrelu(_conv(state, f"{prefix}.2", _lrelu(_conv(state, f"{prefix}.0", x))))


def render(state, task, net_input, codes, map_nc):
    """Outputs per level: (t+1)/2 images for super-resolution and generic, cat(L input, raw chroma) for colour."""
    levels = sum(1 for k in state if k.endswith("_feat.0.weight_v"))
    outputs, styles, feature, out = [], [], None, None
    for i, code in enumerate(codes):
        k = i + 1
        if task == "super-resolution":
            image = net_input[0] if i == 0 else out
        else:
            image = net_input[i]
        n, _, h, w = image.shape
        noise_nc = (code.shape[1] - map_nc) // (h * w)
        parts = [image, code[:, map_nc:].reshape(n, noise_nc, h, w)]
        if i > 0:
            parts.append(feature * 0.1)
        e = _lrelu(_linear(state, f"level_{k}_map_0.0", code[:, :map_nc]))
        s = torch.cat([e] + styles, 1)
        j = 0
        while f"level_{k}_map.{j}.weight" in state:
            s = _lrelu(_linear(state, f"level_{k}_map.{j}", s))
            j += 2
        styles.append(s)
        feature = _style(state, f"level_{k}_style", _conv(state, f"level_{k}_feat.0", torch.cat(parts, 1)), s)
        if task == "super-resolution":
            feature = _up(state, f"level_{k}_up", feature, True)
            out = torch.tanh(_conv(state, f"level_{k}_out.0", feature))
            outputs.append((out + 1) / 2)
        elif task == "colourization":
            if i == levels - 1:
                feature = _up(state, f"level_{k}_up", feature, False)
            out = torch.tanh(_conv(state, f"level_{k}_out.0", feature))
            if i < levels - 1:
                feature = _up(state, f"level_{k}_up", feature, True)
            outputs.append(torch.cat([net_input[i], out], 1))
        else:
            out = torch.tanh(_conv(state, f"level_{k}_out.0", feature))
            outputs.append((out + 1) / 2)
            if i < levels - 1:
                feature = _up(state, f"level_{k}_up", feature, True)
    return outputs
