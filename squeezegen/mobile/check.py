"""Which ops of a .tflite file would leave the mobile GPU delegate.

Two ways: LiteRT's GPU accelerator itself where a Vulkan driver is installed (a software one such as
Mesa >= 25 lavapipe works without a GPU), else a static table of the delegate's op support and its
shape/type rules (after tflite/tools/versioning/gpu_compatibility.cc; ops there and rank <= 4).
The static analyzer that ships with ai-edge-litert calls models with BROADCAST_TO compatible, so it
is not used.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from squeezegen.errors import SqueezegenError
from squeezegen.mobile import vulkan
from squeezegen.mobile.accelerator import captured_native_output

GPU_OPS = frozenset(
    """ABS ADD ADD_N AVERAGE_POOL_2D BATCH_MATMUL CAST CONCATENATION CONV_2D COS CUMSUM DENSIFY
    DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE DIV ELU EQUAL EXP FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED
    GATHER GELU GREATER GREATER_EQUAL HARD_SWISH LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND LOGISTIC LSTM
    MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT PACK PAD PADV2 POW PRELU QUANTIZE
    REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR
    RSQRT SELECT SELECT_V2 SIGN SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE
    STRIDED_SLICE SUB SUM TANH TILE TRANSPOSE TRANSPOSE_CONV""".split()
)
MAX_RANK = 4  # the delegate lays tensors out as BHWC


@dataclass
class OpReport:
    """One model's op census and the ops that would run on the CPU instead of the GPU."""

    path: str
    method: str  # "gpu-accelerator" or "static-table"
    ops: Counter = field(default_factory=Counter)
    off_gpu: Counter = field(default_factory=Counter)  # "OP: reason" -> count
    fully_accelerated: bool | None = None

    @property
    def ok(self) -> bool:
        return not self.off_gpu and self.fully_accelerated is not False


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:
        from squeezegen.errors import MissingDependencyError

        raise MissingDependencyError(
            "reading .tflite files needs ai-edge-litert: pip install 'squeezegen[mobile]'"
        ) from exc
    return schema


def open_tflite(path: Path, threads: int = 1):
    """A LiteRT interpreter for `path`, once LiteRT's loader has checked every offset and constant buffer against
    the file's size: the op table of a truncated file can still read as whole, so the census alone would pass it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        from squeezegen.errors import MissingDependencyError

        raise MissingDependencyError(
            "reading .tflite files needs ai-edge-litert: pip install 'squeezegen[mobile]'"
        ) from exc
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise SqueezegenError(
            f"{path} is truncated or not a .tflite model (no TFL3 identifier): "
            "re-export it with `squeezegen mobile export`"
        )
    try:
        return Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or ["LiteRT cannot load it"])[0]
        raise SqueezegenError(
            f"{path} is truncated or not a valid .tflite model ({reason}): re-export it with `squeezegen mobile export`"
        ) from None


def op_census(path: str | Path) -> list[dict]:
    """Every operator of every subgraph: name, input/output shapes and types, which inputs are constant."""
    schema = _schema()
    path = Path(path)
    if not path.is_file():
        raise SqueezegenError(f"{path} does not exist: pass .tflite files written by `squeezegen mobile export`")
    open_tflite(path)
    buf = path.read_bytes()
    model = schema.Model.GetRootAsModel(buf, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    ops = []
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)

        def tensor(i, sg=sg):
            if i < 0:
                return None
            t = sg.Tensors(i)
            b = model.Buffers(t.Buffer())
            const = b is not None and b.DataLength() > 0 or (b is not None and b.Size() > 0)
            return {"shape": list(t.ShapeAsNumpy()) if t.ShapeLength() else [], "type": types[t.Type()], "const": const}

        for oi in range(sg.OperatorsLength()):
            op = sg.Operators(oi)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "UNKNOWN")
            if name == "CUSTOM":
                name = f"CUSTOM({code.CustomCode().decode()})"
            inputs = [tensor(i) for i in (op.InputsAsNumpy() if op.InputsLength() else [])]
            outputs = [tensor(i) for i in (op.OutputsAsNumpy() if op.OutputsLength() else [])]
            ops.append({"op": name, "inputs": inputs, "outputs": outputs})
    return ops


_FLOAT = {"FLOAT32", "FLOAT16"}


def static_reason(op: dict) -> str | None:
    """Why the GPU delegate would reject this op (None when it would take it)."""
    name = op["op"]
    ins = [t for t in op["inputs"] if t is not None]
    outs = op["outputs"]
    if name not in GPU_OPS:
        return "not supported by the GPU delegate"
    for t in ins + outs:
        if len(t["shape"]) > MAX_RANK:
            return f"{len(t['shape'])}-D tensor (GPU tensors are at most 4-D)"
    runtime = [t for t in ins if not t["const"]]
    if name == "GATHER":
        if len(ins) > 1 and len(ins[1]["shape"]) != 1:
            return "GATHER with indices that are not 1-D"
        return None
    if name == "CAST":
        return None
    if name == "DEQUANTIZE":
        if ins[0]["type"] == "INT16":
            return "int16 DEQUANTIZE"
        # LiteRT's GPU accelerator: "Shape mismatch {O,1,1,I} vs {1,1,O,I}"
        if ins[0]["type"] == "INT8" and len(outs[0]["shape"]) == 2:
            return "int8 DEQUANTIZE of a FULLY_CONNECTED weight (the GPU lays it out as a conv filter)"
        return None
    for t in runtime + outs:
        if t["type"] not in _FLOAT:
            return f"{t['type'].lower()} runtime tensor"
    if name == "FULLY_CONNECTED" and ins and ins[0]["const"]:
        return "FULLY_CONNECTED with a constant input"
    if name == "MUL" and len(ins) == 2 and len(ins[0]["shape"]) == len(ins[1]["shape"]):
        a, b = ins[0]["shape"], ins[1]["shape"]
        if any(x < y for x, y in zip(a, b, strict=True)) and any(y < x for x, y in zip(a, b, strict=True)):
            return "MUL broadcasting both inputs"
    if name in {"SLICE", "STRIDED_SLICE"} and len(ins[0]["shape"]) not in (3, 4):
        return f"{name} on a {len(ins[0]['shape'])}-D tensor (3-D or 4-D only)"
    if name in {"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"} and len(ins) > 1 and not ins[1]["const"]:
        return "reduction axes not constant"
    return None


def gpu_fully_accelerated(path: str | Path) -> bool | None:
    """Compile with LiteRT's GPU accelerator (CPU fallback allowed); None when no GPU path can be opened."""
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    except ImportError:
        return None
    vulkan.activate()
    with captured_native_output():
        try:
            model = CompiledModel.from_file(str(path), hardware_accel=HardwareAccelerator.GPU | HardwareAccelerator.CPU)
        except Exception:  # no usable GPU / driver: report through the static table instead
            return None
    try:
        return model.is_fully_accelerated()
    finally:
        model.close()


def check_tflite(path: str | Path, backend: str = "auto") -> OpReport:
    """Census of `path` and the ops that would fall back to the CPU under the mobile GPU delegate."""
    if backend not in ("auto", "static", "gpu"):
        raise SqueezegenError(f"unknown check backend {backend!r}: use auto, static or gpu")
    ops = op_census(path)
    report = OpReport(str(path), "static-table", Counter(op["op"] for op in ops))
    for op in ops:
        reason = static_reason(op)
        if reason is not None:
            report.off_gpu[f"{op['op']}: {reason}"] += 1
    if backend in ("auto", "gpu"):
        if vulkan.find_driver() is None:
            if backend == "gpu":
                raise SqueezegenError(
                    f"no Vulkan driver for LiteRT's GPU accelerator: {vulkan.SETUP_HINT}, or use --backend static"
                )
        else:
            accelerated = gpu_fully_accelerated(path)
            if accelerated is not None:
                report.method = "gpu-accelerator+static-table"
                report.fully_accelerated = accelerated
            elif backend == "gpu":
                raise SqueezegenError(f"LiteRT's GPU accelerator could not open {path}: use --backend static")
    return report
