"""Command line: ``selfrepair book``, ``selfrepair sweep``, ``selfrepair student`` and ``selfrepair fetch-js``.

Parameter names are the notebooks' (each chapter's config fields); ``--tokens`` is ``n_tokens``.
The precedence for the book is: notebook defaults < ``--profile`` (its per-chapter ``chapters:``
entries over its common ones) < flags (``--model``, ``--param name=value``, ...); ``cache_dir`` is
always passed as an absolute path because papermill runs each notebook from ``book/``. Every
chapter's parameters are checked before the first chapter runs. A run stopped with Ctrl-C or
SIGTERM saves its last finished batch and exits with 130 / 143 and a line saying how to resume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .errors import SelfRepairError

FLAGS = {"model": "model", "dataset": "dataset", "tokens": "n_tokens", "seq_len": "seq_len",
         "batch_size": "batch_size", "device": "device", "dtype": "dtype", "ablation": "ablation",
         "top_percent": "top_percent", "seed": "seed", "remote": "remote"}


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes name=value, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), yaml.safe_load(value)  # "512" -> 512, "null" -> None, "[L1H2]" -> list


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id, local directory, gemma-3-270m or tiny-<family>")
    p.add_argument("--dataset", help="embedded, tiny, a local file/dir or a hub dataset id")
    p.add_argument("--tokens", type=int, help="tokens measured (n_tokens)")
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", help="float32, bfloat16, float64 (default: float32)")
    p.add_argument("--top-percent", type=float, dest="top_percent")
    p.add_argument("--seed", type=int)
    p.add_argument("--remote", nargs="?", const="ndif", choices=("ndif", "local"),
                   help="run every forward pass through nnsight's remote path: on NDIF (bare "
                        "--remote; API key from NDIF_API_KEY or nnsight's config) or 'local' (its "
                        "in-process simulation)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="selfrepair", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("book", help="execute the chapters with papermill and build the HTML book")
    b.add_argument("--profile", help="tiny (tests), cpu (the embedded default), paper (GPU) or a .yaml")
    _add_run_flags(b)
    b.add_argument("--ablation", help="resample, mean or zero")
    b.add_argument("--param", "-p", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="any other notebook parameter (YAML value), repeatable")
    b.add_argument("--chapters", nargs="+", metavar="NN", help="only these chapters (e.g. 01 03); "
                   "others keep their earlier executed copies")
    b.add_argument("--out", type=Path, help="build folder (default: book/_build)")
    b.add_argument("--cache-dir", type=Path, help="results cache (default: results/ at the root)")
    b.add_argument("--root", type=Path, help="the book's root (default: found from the cwd)")
    b.add_argument("--jobs", "-j", type=int, default=1, help="chapters executed at once")
    b.add_argument("--no-strict", dest="strict", action="store_false",
                   help="do not treat Sphinx warnings as errors")
    b.add_argument("--no-execute", dest="execute", action="store_false",
                   help="only rebuild the HTML from the executed notebooks already there")
    b.add_argument("--no-build", dest="build", action="store_false", help="only execute")

    s = sub.add_parser("sweep", help="the cached all-heads self-repair sweep (selfrepair.experiment)")
    _add_run_flags(s)
    s.add_argument("--ablation", default="resample", help="resample, mean or zero")
    s.add_argument("--out", type=Path, default=Path("results"), help="results cache directory")

    t = sub.add_parser("student", help="write the chapter notebooks with the exercise solutions "
                       "stripped (stubs in their place), for a course to hand out")
    t.add_argument("--out", type=Path, default=Path("student"), help="folder to write (default: student/)")
    t.add_argument("--chapters", nargs="+", metavar="NN", help="only these chapters (e.g. 01 03)")
    t.add_argument("--root", type=Path, help="the book's root (default: found from the cwd)")

    f = sub.add_parser("fetch-js", help="write the offline vega bundle and MathJax into book/_static/vendor")
    f.add_argument("--root", type=Path)
    f.add_argument("--force", action="store_true", help="rewrite even if up to date")
    return ap


def _flags(args: argparse.Namespace) -> dict:
    return {name: getattr(args, flag) for flag, name in FLAGS.items()
            if getattr(args, flag, None) is not None}


def cmd_book(args: argparse.Namespace) -> int:
    from .book import find_root, load_profile, run_book
    from .distributed import launched

    if launched():
        raise SelfRepairError("`selfrepair book` runs its chapters in papermill kernels and does not shard: "
                              "precompute the heavy sweep with `torchrun --nproc-per-node N -m "
                              "selfrepair.cli sweep ...` (same parameters), then run the book once, "
                              "without torchrun; it reads that cache entry")
    root = find_root(args.root)
    profile = load_profile(args.profile, root)
    per_chapter = profile.pop("chapters", {})
    flags = {**_flags(args), **dict(args.param)}
    per_chapter = {k: {n: v for n, v in over.items() if n not in flags} for k, over in per_chapter.items()}
    params = {**profile, **flags}
    params["cache_dir"] = str((args.cache_dir or root / "results").resolve())
    return run_book(root, args.out or root / "book" / "_build", params=params, per_chapter=per_chapter,
                    chapters=args.chapters, jobs=args.jobs, strict=args.strict,
                    execute=args.execute, build=args.build)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .chapters import check
    from .chapters.existence import Config
    from .experiment import measure, open_model, open_tokens, sweep_spec
    from .measure import Cache

    cfg = Config.from_params(**{"ablation": "resample", **_flags(args)}, cache_dir=str(args.out))
    check(cfg)  # the model, the corpus and the shapes, before the first forward pass
    from .distributed import close, world

    model, data, spec = open_model(cfg), open_tokens(cfg, open_model(cfg)), sweep_spec(cfg, cfg.ablation)
    try:
        sweep = measure(cfg, spec, data)  # under torchrun: sharded over the ranks, written by rank 0
        if world(model.device).main:
            print(sweep.per_head().to_string(index=False, max_rows=40))
            print(f"cached as {Cache(cfg.cache_dir).path(spec, model, data).resolve()}")
    finally:
        close()
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    from .book import chapter_notebooks, find_root
    from .exercises.student import export

    root = find_root(args.root)
    written = export(chapter_notebooks(root, args.chapters), args.out)
    print(f"{len(written)} student notebooks in {args.out}/ (solutions stripped; run them with the "
          "selfrepair package installed)")
    return 0


def cmd_fetch_js(args: argparse.Namespace) -> int:
    from .book import find_root, vendor_assets

    root = find_root(args.root)
    versions = vendor_assets(root / "book" / "_static", root / ".cache" / "npm", force=args.force)
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .interrupt import Interrupted

    args = parser().parse_args(argv)
    try:
        return {"book": cmd_book, "sweep": cmd_sweep, "student": cmd_student,
                "fetch-js": cmd_fetch_js}[args.command](args)
    except SelfRepairError as e:
        print(f"selfrepair {args.command}: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"selfrepair {args.command}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
