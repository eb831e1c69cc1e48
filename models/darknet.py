"""Darknet cfg + weights -> ONNX, written on the ``onnx`` package (build time only).

Supported layers: ``convolutional`` (batch-norm folded into the convolution; activations
``leaky``, ``linear``, ``relu``, ``logistic``, ``mish``, ``swish``), ``maxpool`` (Darknet's
padding: ``padding`` defaults to ``size - 1`` and goes ``padding // 2`` before and the rest
after, so the ``size=2 stride=1`` pool of YOLOv3-tiny pads right/bottom only), ``route``
(one layer: an alias; several: ``Concat``; ``groups``/``group_id``: a channel slice),
``shortcut`` (``Add``), ``upsample`` (``Resize`` nearest) and ``yolo``.

The graph ends at the YOLO heads: each ``yolo`` layer contributes its *raw* input tensor,
``[1, A*(5+C), H, W]`` (tx, ty, tw, th, objectness, classes per anchor, before any sigmoid or
exp), as a graph output named ``head_s<stride>``. Decoding (sigmoid, anchors, grid, NMS) is
done in numpy by ``agent.inference.decode``: the graph stays a plain CNN, which is what
int8 quantisation handles best, and the heads can be compared one to one with OpenCV's
Darknet importer (its ``conv_<i>`` layer outputs).

The output is deterministic: same cfg + weights + onnx version -> same bytes (no
timestamps, no producer version, fixed opset and IR version).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8  # onnx 1.10+ and every onnxruntime >= 1.10 read it
PRODUCER = "edge-agent models/darknet.py"
# Darknet's CPU batch norm divides by sqrt(variance) + .000001f (normalize_cpu)
BN_EPS = 1e-6


class DarknetError(ValueError):
    """The cfg or weights cannot be converted (unsupported layer, wrong weight count)."""


@dataclass
class Section:
    kind: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0

    def get_int(self, key: str, default: int | None = None) -> int:
        if key not in self.options:
            if default is None:
                raise DarknetError(f"[{self.kind}] at line {self.line}: missing {key}=")
            return default
        return int(self.options[key])

    def get_float(self, key: str, default: float) -> float:
        return float(self.options.get(key, default))

    def get_ints(self, key: str) -> list[int]:
        return [int(v) for v in self.options.get(key, "").split(",") if v.strip()]

    def get_str(self, key: str, default: str) -> str:
        return self.options.get(key, default).strip()


def parse_cfg(text: str) -> list[Section]:
    """The sections of a Darknet cfg file, in order ([net] first)."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            sections.append(Section(m.group(1), {}, number))
            continue
        if "=" not in line or not sections:
            raise DarknetError(f"cfg line {number}: cannot parse {raw!r}")
        key, value = line.split("=", 1)
        sections[-1].options[key.strip()] = value.strip()
    if not sections or sections[0].kind not in ("net", "network"):
        raise DarknetError("cfg does not start with [net]")
    return sections


@dataclass
class YoloHead:
    """One YOLO output of the converted graph."""

    output: str  # graph output name, head_s<stride>
    stride: int
    grid: tuple[int, int]  # H, W
    mask: list[int]
    anchors: list[tuple[float, float]]  # all anchors of the layer, in input pixels
    classes: int
    scale_x_y: float
    cfg_index: int  # index of the [yolo] section (0 = first after [net])
    source_index: int  # index of the layer whose output is the head (OpenCV names it conv_<i>)


@dataclass
class Converted:
    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, int, int, int]
    heads: list[YoloHead]
    weights_header: tuple[int, int, int, int]  # major, minor, revision, seen


class _Weights:
    def __init__(self, data: bytes) -> None:
        header = np.frombuffer(data[:12], dtype="<i4")
        major, minor, revision = (int(v) for v in header)
        if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
            seen = int(np.frombuffer(data[12:20], dtype="<i8")[0])
            offset = 20
        else:
            seen = int(np.frombuffer(data[12:16], dtype="<i4")[0])
            offset = 16
        if (len(data) - offset) % 4:
            raise DarknetError("weights file size is not a whole number of float32 values")
        self.header = (major, minor, revision, seen)
        self.values = np.frombuffer(data[offset:], dtype="<f4")
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        if self.pos + n > self.values.size:
            raise DarknetError(
                f"weights file too short: needs more than {self.values.size} values (cfg does not match the weights)"
            )
        out = self.values[self.pos : self.pos + n].astype(np.float32)
        self.pos += n
        return out


def convert(cfg_text: str, weights: bytes, *, input_name: str = "input") -> Converted:
    """Build the ONNX model for a Darknet cfg and its weights (batch 1, the cfg's width/height)."""
    sections = parse_cfg(cfg_text)
    net = sections[0]
    height, width, channels = net.get_int("height"), net.get_int("width"), net.get_int("channels", 3)
    w = _Weights(weights)

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    names: list[str] = []  # output tensor of each layer
    shapes: list[tuple[int, int, int]] = []  # C, H, W of each layer's output
    heads: list[YoloHead] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    prev_name, prev_shape = input_name, (channels, height, width)
    for i, sec in enumerate(sections[1:]):
        out = f"l{i}_{sec.kind}"
        c, h, wd = prev_shape
        if sec.kind == "convolutional":
            filters, size = sec.get_int("filters"), sec.get_int("size")
            stride, groups = sec.get_int("stride", 1), sec.get_int("groups", 1)
            pad = size // 2 if sec.get_int("pad", 0) else sec.get_int("padding", 0)
            bn = sec.get_int("batch_normalize", 0)
            if c % groups or filters % groups:
                raise DarknetError(f"[convolutional] #{i}: groups={groups} does not divide the channels")
            bias = w.take(filters)
            if bn:
                gamma, mean, var = w.take(filters), w.take(filters), w.take(filters)
            kernel = w.take(filters * (c // groups) * size * size).reshape(filters, c // groups, size, size)
            if bn:
                scale = gamma / (np.sqrt(var) + BN_EPS)
                kernel = kernel * scale[:, None, None, None]
                bias = bias - mean * scale
            conv_out = out if sec.get_str("activation", "logistic") == "linear" else f"{out}_pre"
            nodes.append(
                helper.make_node(
                    "Conv",
                    [
                        prev_name,
                        const(f"{out}.weight", kernel.astype(np.float32)),
                        const(f"{out}.bias", bias.astype(np.float32)),
                    ],
                    [conv_out],
                    name=f"{out}_conv",
                    kernel_shape=[size, size],
                    strides=[stride, stride],
                    pads=[pad, pad, pad, pad],
                    group=groups,
                )
            )
            nodes.extend(_activation(sec.get_str("activation", "logistic"), conv_out, out, i))
            oh = (h + 2 * pad - size) // stride + 1
            ow = (wd + 2 * pad - size) // stride + 1
            shape = (filters, oh, ow)
        elif sec.kind == "maxpool":
            size = sec.get_int("size", 1)
            stride = sec.get_int("stride", 1)
            padding = sec.get_int("padding", size - 1)
            before, after = padding // 2, padding - padding // 2
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    [prev_name],
                    [out],
                    name=out,
                    kernel_shape=[size, size],
                    strides=[stride, stride],
                    pads=[before, before, after, after],
                )
            )
            # Darknet: (w + padding - size) / stride + 1
            shape = (c, (h + padding - size) // stride + 1, (wd + padding - size) // stride + 1)
        elif sec.kind == "route":
            refs = [r if r >= 0 else i + r for r in sec.get_ints("layers")]
            if not refs or any(r < 0 or r >= i for r in refs):
                raise DarknetError(f"[route] #{i}: layers={sec.options.get('layers')} out of range")
            groups, group_id = sec.get_int("groups", 1), sec.get_int("group_id", 0)
            if groups > 1 and len(refs) > 1:
                raise DarknetError(f"[route] #{i}: groups with several layers is not supported")
            if len(refs) == 1:
                src, (rc, rh, rw) = names[refs[0]], shapes[refs[0]]
            else:
                if len({shapes[r][1:] for r in refs}) != 1:
                    raise DarknetError(f"[route] #{i}: layers {refs} have different sizes")
                nodes.append(helper.make_node("Concat", [names[r] for r in refs], [out], name=out, axis=1))
                src, rc, rh, rw = out, sum(shapes[r][0] for r in refs), shapes[refs[0]][1], shapes[refs[0]][2]
            if groups > 1:
                part = rc // groups
                starts = const(f"{out}.starts", np.array([group_id * part], np.int64))
                ends = const(f"{out}.ends", np.array([(group_id + 1) * part], np.int64))
                axes = const(f"{out}.axes", np.array([1], np.int64))
                sliced = f"{out}_group"
                nodes.append(helper.make_node("Slice", [src, starts, ends, axes], [sliced], name=sliced))
                src, rc = sliced, part
            out = src  # a single-layer route is an alias: no node
            shape = (rc, rh, rw)
        elif sec.kind == "shortcut":
            ref = sec.get_int("from")
            ref = ref if ref >= 0 else i + ref
            if not 0 <= ref < i or shapes[ref] != prev_shape:
                raise DarknetError(
                    f"[shortcut] #{i}: from={sec.options.get('from')} is out of range or of another shape"
                )
            added = out if sec.get_str("activation", "linear") == "linear" else f"{out}_pre"
            nodes.append(helper.make_node("Add", [prev_name, names[ref]], [added], name=f"{out}_add"))
            nodes.extend(_activation(sec.get_str("activation", "linear"), added, out, i))
            shape = prev_shape
        elif sec.kind == "upsample":
            s = sec.get_int("stride", 2)
            scales = const(f"{out}.scales", np.array([1, 1, s, s], np.float32))
            nodes.append(
                helper.make_node(
                    "Resize",
                    [prev_name, "", scales],
                    [out],
                    name=out,
                    mode="nearest",
                    coordinate_transformation_mode="asymmetric",
                    nearest_mode="floor",
                )
            )
            shape = (c, h * s, wd * s)
        elif sec.kind == "yolo":
            mask = sec.get_ints("mask")
            flat = [float(v) for v in sec.options.get("anchors", "").split(",") if v.strip()]
            anchors = [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]
            classes = sec.get_int("classes", 80)
            if c != len(mask) * (5 + classes):
                raise DarknetError(f"[yolo] #{i}: input has {c} channels, expected {len(mask)}*(5+{classes})")
            if height % h or width % wd or height // h != width // wd:
                raise DarknetError(f"[yolo] #{i}: grid {h}x{wd} does not divide the input")
            stride = width // wd
            head = f"head_s{stride}"
            nodes.append(helper.make_node("Identity", [prev_name], [head], name=head))
            heads.append(
                YoloHead(head, stride, (h, wd), mask, anchors, classes, sec.get_float("scale_x_y", 1.0), i, i - 1)
            )
            out, shape = prev_name, prev_shape
        else:
            raise DarknetError(f"[{sec.kind}] #{i} (cfg line {sec.line}): layer type not supported")
        names.append(out)
        shapes.append(shape)
        prev_name, prev_shape = out, shape

    if w.pos != w.values.size:
        raise DarknetError(
            f"weights file has {w.values.size - w.pos} values left over after the last layer (cfg does not match)"
        )
    if not heads:
        raise DarknetError("the cfg has no [yolo] layer")

    graph = helper.make_graph(
        nodes,
        "darknet",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, channels, height, width])],
        [
            helper.make_tensor_value_info(hd.output, TensorProto.FLOAT, [1, len(hd.mask) * (5 + hd.classes), *hd.grid])
            for hd in heads
        ],
        inits,
    )
    model = helper.make_model(
        graph, producer_name=PRODUCER, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model, full_check=True)
    return Converted(model, input_name, (1, channels, height, width), heads, w.header)


def _activation(kind: str, src: str, out: str, i: int) -> list[onnx.NodeProto]:
    if kind == "linear":
        return []
    if kind == "leaky":
        return [helper.make_node("LeakyRelu", [src], [out], name=f"{out}_leaky", alpha=0.1)]
    if kind == "relu":
        return [helper.make_node("Relu", [src], [out], name=f"{out}_relu")]
    if kind == "logistic":
        return [helper.make_node("Sigmoid", [src], [out], name=f"{out}_sigmoid")]
    if kind == "swish":
        return [
            helper.make_node("Sigmoid", [src], [f"{out}_sig"], name=f"{out}_sig"),
            helper.make_node("Mul", [src, f"{out}_sig"], [out], name=f"{out}_swish"),
        ]
    if kind == "mish":
        return [
            helper.make_node("Softplus", [src], [f"{out}_sp"], name=f"{out}_sp"),
            helper.make_node("Tanh", [f"{out}_sp"], [f"{out}_tanh"], name=f"{out}_tanh"),
            helper.make_node("Mul", [src, f"{out}_tanh"], [out], name=f"{out}_mish"),
        ]
    raise DarknetError(f"layer #{i}: activation {kind!r} not supported")


def convert_files(cfg: Path, weights: Path) -> Converted:
    return convert(cfg.read_text(encoding="utf-8"), weights.read_bytes())


def opencv_heads(cfg: Path, weights: Path, blob: np.ndarray, heads: list[YoloHead]) -> list[np.ndarray]:
    """The reference: OpenCV 4.x's Darknet importer, the raw outputs of the layers feeding the heads."""
    import cv2

    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        raise RuntimeError(
            f"OpenCV {cv2.__version__} has no Darknet importer (removed in 5.x): install opencv-python-headless<5"
        )
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.setInput(blob)
    names = [f"conv_{hd.source_index}" for hd in heads]
    missing = [n for n in names if n not in net.getLayerNames()]
    if missing:
        raise RuntimeError(f"OpenCV's net has no layer {missing}: cannot compare the heads")
    outs: Any = net.forward(names)
    return [np.asarray(o) for o in outs]
