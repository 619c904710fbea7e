"""Compile the fused kernels for a CUDA target on a machine without a GPU, and report registers,
spilled bytes (STACK) and shared memory per kernel.

The arguments are the ones ``fused_attention`` builds for a layer shape (CPU tensors, the launch
intercepted), specialised as a JIT launch would (ints equal to 1 become constants, ints divisible
by 16 and pointers get the divisibility hint), so the code is what a GPU would run:

    python benchmarks/fused_compile_check.py                       # sm_90, Qwen3-4B layer, bf16
    ARCH=80 SPECS='[{"D": 64}, {"D": 256, "dtype": "float16"}]' python benchmarks/fused_compile_check.py
"""
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from attnrhythm.capture import fused  # noqa: E402

ARCH = int(os.environ.get("ARCH", "90"))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32"}
recorded = []


def _record(kernel, grid_of, blocks, args, constexprs):
    recorded.append((kernel, args, constexprs(blocks)))


def compile_recorded(kernel, args, const: dict, dtype) -> str:
    signature, constants, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + TYPES[arg.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, float):
            signature[name] = "fp32"
        elif arg == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(arg) < 2**31 else "i64"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    warps, stages = const.pop("num_warps"), const.pop("num_stages")
    const.update(UPCAST=False, PRECISION="ieee" if dtype == torch.float32 else "tf32")
    for name, value in const.items():
        signature[name], constants[name] = "constexpr", value
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCH, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return (f"registers {found.group(1)}, spilled bytes {found.group(2)}, shared {compiled.metadata.shared} B, "
            f"warps {warps}, stages {stages}")


def run(B=1, H=32, HKV=8, N=4096, D=128, dtype=torch.bfloat16, blocks=None, **kwargs) -> None:
    q = torch.empty(B, N, H, D, dtype=dtype).transpose(1, 2)  # the layout transformers passes
    k = torch.empty(B, N, HKV, D, dtype=dtype).transpose(1, 2)
    band = torch.zeros(B, 5, H, N, 101)[:, 2]  # one slot of AttentionStats.band
    recorded.clear()
    fused.fused_attention(q, k, torch.empty_like(k), torch.ones(B, N, dtype=torch.bool), band_width=101,
                          scaling=D ** -0.5, band=band, blocks={**fused.default_blocks(D, "cuda"), **(blocks or {})},
                          **kwargs)
    for kernel, args, const in recorded:
        label = f"sm_{ARCH} {kernel.__name__} {str(dtype)[6:]} D={D} {kwargs or ''} {blocks or ''}"
        try:
            print(f"{label}: {compile_recorded(kernel, args, dict(const), dtype)}", flush=True)
        except Exception as err:  # noqa: BLE001 - report every configuration
            print(f"{label}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)


if __name__ == "__main__":
    fused._launch = _record
    for spec in json.loads(os.environ.get("SPECS", "[{}]")):
        if "dtype" in spec:
            spec["dtype"] = getattr(torch, spec["dtype"])
        run(**spec)
