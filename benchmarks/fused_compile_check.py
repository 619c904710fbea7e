"""Compile the fused kernels for CUDA targets on a machine without a GPU (Triton's bundled ptxas)
and record registers, spilled bytes (STACK), shared memory, warps and stages per kernel variant.

The launch arguments are the ones ``fused_attention`` builds for a layer shape (CPU tensors, the
launch intercepted), specialised as a JIT launch would (ints equal to 1 become constants, ints
divisible by 16 and pointers get the divisibility hint), so the code is what a GPU would run.
Variants: the Qwen3-4B layer (bf16, D=128, GQA 32/8) with the default tiles (output + statistics,
statistics only as inside training, the column pass with and without column sums), sliding
window + softcap + sinks, head dims 64/80/256, float16, float32 (exact and TF32), 64-bit offsets,
and the ``SMALLER`` fallback tiles.

    python benchmarks/fused_compile_check.py     # sm_90 and sm_80 -> benchmarks/results/fused_compile_sm90.txt
    python benchmarks/fused_compile_check.py --arch 90 --out /tmp/record.txt
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from attnrhythm.capture import fused  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32"}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fused_compile_sm90.txt")

# name: (shape and fused_attention keyword arguments)
VARIANTS = {
    "qwen3-4b layer": dict(),
    "statistics only (in training)": dict(write_output=False),
    "no column sums (band only)": dict(need_col_sum=False),
    "window + softcap + sinks": dict(sliding_window=1024, softcap=50.0, sinks=True),
    "head dim 64": dict(D=64),
    "head dim 80 (masked)": dict(D=80),
    "head dim 256": dict(D=256),
    "float16": dict(dtype=torch.float16),
    "float32 (ieee)": dict(dtype=torch.float32),
    "float32 (tf32)": dict(dtype=torch.float32, tf32=True),
    "64-bit offsets": dict(wide=True),
    "fallback tiles (SMALLER)": dict(blocks=fused.SMALLER),
}


def compile_launch(kernel, args, const: dict, arch: int) -> dict:
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
    for name, value in const.items():
        signature[name], constants[name] = "constexpr", value
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(registers=int(found.group(1)), spilled=int(found.group(2)), shared=compiled.metadata.shared,
                warps=warps, stages=stages)


def launches(arch: int, D=128, dtype=torch.bfloat16, blocks=None, tf32=False, wide=False, sinks=False, B=1, H=32,
             HKV=8, N=4096, **kwargs) -> list[tuple]:
    """(kernel, args, constexprs) of the launches ``fused_attention`` makes for this layer."""
    q = torch.empty(B, N, H, D, dtype=dtype).transpose(1, 2)  # the layout transformers passes
    k = torch.empty(B, N, HKV, D, dtype=dtype).transpose(1, 2)
    band = torch.zeros(B, 5, H, N, 101)[:, 2]  # one slot of AttentionStats.band
    recorded = []
    saved = fused._launch, fused.INT32_LIMIT, torch.get_float32_matmul_precision()
    fused._launch = lambda kernel, grid_of, chosen, args, constexprs: recorded.append(
        (kernel, args, {**constexprs(chosen), "UPCAST": False, "PRECISION": fused.dot_precision(dtype, False)}))
    fused.INT32_LIMIT = 0 if wide else fused.INT32_LIMIT
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    blocks = {**fused.default_blocks(D, dtype, (arch // 10, arch % 10)), **(blocks or {})}
    try:
        fused.fused_attention(q, k, torch.empty_like(k), torch.ones(B, N, dtype=torch.bool), band_width=101,
                              scaling=D ** -0.5, band=band, blocks=blocks, s_aux=torch.zeros(H) if sinks else None,
                              **kwargs)
    finally:
        fused._launch, fused.INT32_LIMIT = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
    return recorded


def tools(archs) -> str:
    """Versions of what compiled the record (Triton picks a ptxas per architecture)."""
    from triton.backends.nvidia.compiler import get_ptxas

    def version(arch):
        found = re.search(r"V[\d.]+", subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True,
                                                     text=True).stdout)
        return f"sm_{arch}: ptxas {found.group(0) if found else '?'}"
    return f"triton {triton.__version__}, torch {torch.__version__}, " + ", ".join(version(a) for a in archs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = H100)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the record (rewritten)")
    args = parser.parse_args(argv)
    lines = [f"# Fused kernels compiled without a GPU ({tools(args.arch)}); regenerate: python benchmarks/fused_compile_check.py",
             "# Qwen3-4B layer: B=1, 32 query / 8 KV heads, N=4096, band 101, bf16, default tiles unless named.",
             "# registers per thread (max 255), spilled = STACK bytes per thread (0 = no spills), shared = bytes",
             "| arch | variant | kernel | tiles (m x n) | registers | spilled | shared | warps | stages |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for arch in args.arch:
        for name, spec in VARIANTS.items():
            for kernel, launch_args, const in launches(arch, **spec):
                tiles = f"{const['BLOCK_M']} x {const['BLOCK_N']}"
                try:
                    r = compile_launch(kernel, launch_args, dict(const), arch)
                    cells = f"{r['registers']} | {r['spilled']} | {r['shared']} | {r['warps']} | {r['stages']}"
                except Exception as err:  # noqa: BLE001 - record every variant, failures included
                    cells = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:120]} | | | |"
                line = f"| sm_{arch} | {name} | {kernel.__name__} | {tiles} | {cells} |"
                print(line, flush=True)
                lines.append(line)
    with contextlib.suppress(FileExistsError):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
