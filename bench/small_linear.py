"""Small-row bf16 linears: our kernel (csrc/small_linear.cpp) vs oneDNN's packed product vs `F.linear`,
side by side in one run, on every product of one forward of the model.

    .venv/bin/python bench/small_linear.py [--rows 1,4,8,16,32,64,96,128] [--threads 2] [--rounds 3]

The model is packed and fused as the engine does it (`pack_linears(small_kernel=True)`, `fuse_linears`:
per layer fused q/k/v, o, fused gate/up and down, and the head), so each pass reads every weight once,
from memory, as a decode step does. For each row count the three variants take turns, `--rounds` times;
the table gives each one's fastest pass. Where the kernel is not built for this CPU (no AVX512-BF16, or
AMX: packed_linear.py) its column says so and the others still run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


def _products(model) -> list[tuple]:
    """(packed, small, weight, bias) of every distinct product: fused groups once, other packed linears."""
    products, groups = [], set()
    for module in model.modules():
        group = getattr(module, "_softserve_fused", None)
        if group is not None:
            if id(group) not in groups:
                groups.add(id(group))
                products.append((group.packed, group.small, group.weight, group.bias))
            continue
        state = getattr(module, "_softserve_packed", None)
        if state is not None and state[0] is not None:
            products.append((state[0], state[2], module.weight, module.bias))
    return products


def run(args) -> dict:
    import torch

    from softserve.engine import native_kernels
    from softserve.engine.fused_linear import fuse_linears
    from softserve.engine.packed_linear import pack_linears

    C.setup_torch(args)
    model, _, name, _, dtype = C.load(args.model, "cpu", "bfloat16")
    kernel = native_kernels.small_linear_available()
    with torch.no_grad():
        pack_linears(model, small_kernel=True)
        fuse_linears(model)
        products = _products(model)
        if kernel:  # the kernel packs only even K: compare on the products it has a copy of
            products = [p for p in products if p[1] is not None]
        rows_list = [int(r) for r in args.rows.split(",")] if args.rows else ([1, 4] if args.quick else [1, 4, 8, 16, 32, 64, 96, 128])
        rounds = args.rounds or (1 if args.quick else 3)
        variants = {
            "F.linear": lambda x, p: torch.nn.functional.linear(x, p[2], p[3]),
            "oneDNN packed": lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p[0], p[3], "none", [], ""),
        }
        if kernel:
            variants["ours"] = lambda x, p: native_kernels.small_linear(x, p[1], p[3], p[2].shape[0])
        table = []
        for rows in rows_list:
            inputs = {p[2].shape[1]: torch.randn(1, rows, p[2].shape[1]).to(torch.bfloat16) for p in products}
            best = {v: float("inf") for v in variants}
            for _ in range(rounds):
                for label, fn in variants.items():
                    for p in products:  # warm: oneDNN builds its primitive per shape
                        fn(inputs[p[2].shape[1]], p)
                    start = time.perf_counter()
                    for p in products:
                        fn(inputs[p[2].shape[1]], p)
                    best[label] = min(best[label], time.perf_counter() - start)
            table.append({"rows": rows, **{label: 1000 * t for label, t in best.items()}})
            print(f"rows {rows}: " + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in best.items()), file=sys.stderr, flush=True)
    weight_bytes = sum(p[2].numel() * p[2].element_size() for p in products)
    return {"name": "small_linear", "model": name, "dtype": str(dtype), "kernel": kernel, "products": len(products),
            "weight_bytes": weight_bytes, "rounds": rounds, "rows": table, "machine": C.machine_facts()}


def render(result: dict) -> str:
    mb = result["weight_bytes"] / 1e6
    lines = [f"### Small-row bf16 linears ({result['model']}: {result['products']} products, {mb:.0f} MB of weights per pass; "
             f"fastest of {result['rounds']} interleaved passes)", ""]
    if not result["kernel"]:
        lines += ["The small-row kernel is not built for this CPU (no AVX512-BF16, or AMX): oneDNN serves these rows.", ""]
    rows = []
    for r in result["rows"]:
        ours = r.get("ours")
        rows.append([r["rows"], r["F.linear"], r["oneDNN packed"], ours if ours is not None else "n/a",
                     f"{r['oneDNN packed'] / ours:.2f}x" if ours else "n/a", f"{mb / 1000 / (min(v for k, v in r.items() if k != 'rows') / 1000):.0f}"])
    lines.append(C.md_table(["rows", "F.linear ms", "oneDNN packed ms", "ours ms", "ours vs packed", "best GB/s"], rows, digits=2))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--rows", default=None, help="rows per product (comma list)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved passes per variant")
    return parser


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
