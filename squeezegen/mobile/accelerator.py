"""Exported .tflite files executed through LiteRT's CompiledModel on the GPU accelerator (no CPU
fallback) or on the CPU, and the check that compares the two.

The GPU accelerator computes in fp16 unless `fp32` is asked, as a phone GPU does; the check runs the
same inputs through the CPU in fp32 and reports the fp16 error, non-finite outputs and the adapter
(the driver's own name, e.g. "llvmpipe" for the software driver: its timings are not a phone's).
"""

from __future__ import annotations

import atexit
import gc
import io
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from squeezegen.errors import MissingDependencyError, SqueezegenError
from squeezegen.mobile import vulkan

ACCELERATORS = ("cpu", "gpu")
# largest GPU-vs-CPU error a file may show, as a share of its largest fp32 output value: fp16 keeps 11
# bits and a deep UNet accumulates some; the files that run stay at or below 4.3% (SD 1.5's UNet part 2,
# docs/methods/mobile_sd.md), while a wrong computation (CLIP's ADDed mask on the GPU) is 11.7% off
FP16_TOLERANCE = 0.05
_ADAPTER = re.compile(r"Selected adapter: ([^\n]*)")
_STATUS = re.compile(r"\b((?:INVALID_ARGUMENT|UNIMPLEMENTED|FAILED_PRECONDITION|RESOURCE_EXHAUSTED|INTERNAL): [^\n]*)")


def native_reason(log: str) -> str | None:
    """The accelerator's own reason in its log (ML Drift's status line, e.g. "UNIMPLEMENTED: ..."), which
    the Python exception ("Failed to modify graph with delegate") leaves out."""
    found = _STATUS.findall(log)
    return found[-1].strip() if found else None


def _litert():
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, GpuOptions, Options
    except ImportError as exc:
        raise MissingDependencyError(
            "running .tflite files needs ai-edge-litert: pip install 'squeezegen[mobile]'"
        ) from exc
    return CompiledModel, HardwareAccelerator, CpuOptions, GpuOptions, Options


@contextmanager
def captured_native_output():
    """What LiteRT's native code writes to file descriptors 1 and 2 meanwhile (its log; the OpenCL probe
    prints to stdout) into a list of one string: the adapter line is read back from it, and a command's
    stdout stays its own."""
    log: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            log.append(sink.read().decode(errors="replace"))


def quiet_native_log() -> None:
    """For the rest of the process, LiteRT's native log (file descriptor 2: accelerator registration, the
    OpenCL probe, teardown lines after the output) goes to a temporary file, while Python's own stderr
    (progress bars, errors) stays on the terminal. For commands; a library caller keeps LiteRT's log."""
    if _QUIET:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    fd, path = tempfile.mkstemp(prefix="squeezegen-litert-", suffix=".log")
    os.dup2(fd, 2)
    os.close(fd)
    atexit.register(os.unlink, path)
    sys.stderr = io.TextIOWrapper(io.FileIO(terminal, "w"), line_buffering=True, errors="backslashreplace")
    _QUIET.append(path)


_QUIET: list[str] = []


class CompiledRunner:
    """One .tflite file compiled for one accelerator, called like LiteRT's signature runner:
    `runner(args_0=..., args_1=...) -> {"output_0": ...}`."""

    adapter: str = "cpu"

    def __init__(self, path: str | Path, accelerator: str = "cpu", threads: int = 1, fp32: bool = False):
        if accelerator not in ACCELERATORS:
            raise SqueezegenError(f"unknown accelerator {accelerator!r}: use cpu or gpu")
        compiled_model, hw, cpu_options, gpu_options, options = _litert()
        self.path = Path(path)
        self.accelerator = accelerator
        if accelerator == "gpu":
            vulkan.activate()
            opts = options(hw.GPU, gpu_options=gpu_options(enforce_f32=fp32))
        else:
            opts = options(hw.CPU, cpu_options=cpu_options(num_threads=threads))
        with captured_native_output() as log:
            try:
                self.model = compiled_model.from_file(str(self.path), options=opts)
                error = None
            except Exception as exc:  # LiteRT raises RuntimeError/ValueError with its status text
                error = str(exc).strip().splitlines()[-1].lstrip("└ ") if str(exc).strip() else type(exc).__name__
        text = log[0]
        if error is not None:
            reason = native_reason(text) or error
            raise SqueezegenError(f"{self.path} does not run on LiteRT's {accelerator.upper()} accelerator: {reason}")
        found = _ADAPTER.search(text)
        if accelerator == "gpu":
            self.adapter = found.group(1).strip() if found else _ADAPTER_SEEN.get("gpu", "GPU (adapter not logged)")
            _ADAPTER_SEEN.setdefault("gpu", self.adapter)
        signature = self.model.get_signature_by_index(0)
        self.key = signature["key"]
        self.input_names = list(signature["inputs"])
        self.output_names = list(signature["outputs"])
        self.inputs = self.model.get_input_tensor_details(self.key)
        self.outputs = self.model.get_output_tensor_details(self.key)
        self.fully_accelerated = bool(self.model.is_fully_accelerated())
        # an output that is an input tensor (a UNet part hands on temb and earlier skips) is never
        # written by CompiledModel (garbage on the CPU, zeros on the GPU): it is the input, given back
        self.passthrough = passthrough_outputs(self.path)
        self._in = {n: self.model.create_input_buffer_by_name(self.key, n) for n in self.input_names}
        self._out = {n: self.model.create_output_buffer_by_name(self.key, n) for n in self.output_names}

    def close(self) -> None:
        """Release the model, its buffers and its LiteRT environment now, with their native log kept off
        the terminal (left to the interpreter's exit, each prints lines after the command's output)."""
        with captured_native_output():
            self._in = self._out = {}
            if self.model is not None:
                self.model.close()
            self.model = None
            gc.collect()

    def __call__(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        for name, buffer in self._in.items():
            spec = self.inputs[name]
            a = np.ascontiguousarray(arrays[name], dtype=spec["dtype"])
            if list(a.shape) != list(spec["shape"]):
                raise SqueezegenError(f"{self.path}: input {name} has shape {list(a.shape)}, not {list(spec['shape'])}")
            buffer.write(a)
        try:
            self.model.run_by_name(self.key, self._in, self._out)
        except RuntimeError as exc:  # compiled, then failed (e.g. a buffer the driver cannot map)
            last = str(exc).strip().splitlines()[-1].lstrip("└ ") if str(exc).strip() else type(exc).__name__
            raise SqueezegenError(
                f"{self.path} compiled for LiteRT's {self.accelerator.upper()} accelerator but failed while running: "
                f"{last}; run it on the CPU (--accelerator cpu)"
            ) from None
        result = {
            out: np.array(arrays[given], dtype=self.outputs[out]["dtype"]) for out, given in self.passthrough.items()
        }
        for name, buffer in self._out.items():
            spec = self.outputs[name]
            if name in self.passthrough:
                continue
            result[name] = buffer.read(int(np.prod(spec["shape"])), spec["dtype"]).reshape(spec["shape"])
        return {name: result[name] for name in self.output_names}


def passthrough_outputs(path: Path) -> dict[str, str]:
    """Outputs of the file's first signature that are one of its inputs: {output name: input name}."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    if not model.SignatureDefsLength():
        return {}
    sig = model.SignatureDefs(0)
    inputs = {sig.Inputs(i).TensorIndex(): sig.Inputs(i).Name().decode() for i in range(sig.InputsLength())}
    outputs = [(sig.Outputs(i).Name().decode(), sig.Outputs(i).TensorIndex()) for i in range(sig.OutputsLength())]
    return {name: inputs[index] for name, index in outputs if index in inputs}


_ADAPTER_SEEN: dict[str, str] = {}  # Dawn names the adapter once per process, when the first model compiles


@dataclass
class GpuCheck:
    """One file run on the GPU accelerator alone and on the CPU in fp32, on the same seeded inputs."""

    path: str
    runs_on_gpu: bool
    error: str | None = None
    adapter: str | None = None
    fully_accelerated: bool | None = None
    max_abs_error: float | None = None
    rel_error: float | None = None  # max |gpu - cpu| / max |cpu|
    finite: bool | None = None
    gpu_s: float | None = None
    cpu_s: float | None = None

    @property
    def ok(self) -> bool:
        return bool(
            self.runs_on_gpu and self.finite and self.rel_error is not None and self.rel_error <= FP16_TOLERANCE
        )

    def verdict(self) -> str:
        if not self.runs_on_gpu:
            return f"does not run on the GPU alone: {self.error}"
        if not self.finite:
            return "non-finite values on the GPU (fp16 overflow)"
        if not self.rel_error <= FP16_TOLERANCE:  # NaN included
            return (
                f"the GPU's result differs from the CPU's fp32 by {self.rel_error:.2%} of the output range, "
                f"over the {FP16_TOLERANCE:.0%} tolerance"
            )
        return "GPU ok"


def seeded_inputs(runner: CompiledRunner, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs (integers zero) of the file's own shapes, from `seed`."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in runner.input_names:
        spec = runner.inputs[name]
        dtype = np.dtype(spec["dtype"])
        shape = [int(s) for s in spec["shape"]]
        out[name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return out


def _timed(runner, inputs: dict[str, np.ndarray], names: list[str]) -> tuple[list[np.ndarray], float]:
    runner(**inputs)  # the first call uploads weights and builds kernels
    t0 = time.perf_counter()
    out = runner(**inputs)
    return [np.asarray(out[n]) for n in names], time.perf_counter() - t0


def cpu_reference(path: Path):
    """LiteRT's CPU interpreter (XNNPACK, fp32) for `path`, called like a signature runner: the reference,
    as the pipeline's CPU path. CompiledModel on the CPU was not one: on a SD 1.5 UNet part it returned
    non-finite values on some runs of the same inputs."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=1).get_signature_runner()


def check_on_gpu(path: str | Path, inputs: dict[str, np.ndarray] | None = None, seed: int = 0) -> GpuCheck:
    """Run `path` on the GPU accelerator alone (fp16) and on the CPU interpreter (fp32) with the same inputs
    (given, or `seeded_inputs`); a file the GPU rejects gives runs_on_gpu False and the accelerator's reason."""
    try:
        gpu = CompiledRunner(path, "gpu")
    except SqueezegenError as exc:
        if "no Vulkan driver" in str(exc):
            raise
        return GpuCheck(str(path), False, error=str(exc).split(": ", 1)[-1])
    inputs = inputs if inputs is not None else seeded_inputs(gpu, seed)
    try:
        with captured_native_output():
            got, gpu_s = _timed(gpu, inputs, gpu.output_names)
    except SqueezegenError as exc:  # compiled, then failed to execute
        reason = str(exc).split("failed while running: ", 1)[-1].split("; run it on the CPU")[0]
        return GpuCheck(str(path), False, error=f"compiles, fails while running: {reason}")
    finally:
        gpu.close()
    want, cpu_s = _timed(cpu_reference(Path(path)), inputs, gpu.output_names)
    finite = all(bool(np.isfinite(g).all()) for g in got)
    diff = max(float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, want, strict=True))
    scale = max(float(np.abs(w).max()) for w in want) or 1.0
    return GpuCheck(
        str(path),
        True,
        adapter=gpu.adapter,
        fully_accelerated=gpu.fully_accelerated,
        max_abs_error=diff if finite else float("inf"),
        rel_error=diff / scale if finite else float("inf"),
        finite=finite,
        gpu_s=gpu_s,
        cpu_s=cpu_s,
    )
