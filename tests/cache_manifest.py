"""The tiny profile's results cache, described: every entry's file name (which holds its key's
digest), its key, its JSON attributes and each tensor's shape, dtype, SHA-256 and a summary.

``tests/cache_manifest.json`` is this description of the cache that ``selfrepair measure --profile
tiny`` (every chapter) writes; tests/test_measure.py checks a fresh cache against it, so a change
that moves any cache key or any cached number is seen. Integer tensors (selections: instances,
indices) must be equal; float tensors equal to their SHA-256 or, where the bits differ (another
BLAS, another CPU), to their summaries within 1e-5. When a change legitimately moves an entry (a
new spec field, a new rule), rebuild it and commit it with the change, saying why::

    .venv/bin/python tests/cache_manifest.py            # writes tests/cache_manifest.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = Path(__file__).with_name("cache_manifest.json")
TOLERANCE = 1e-5


def _summary(t: torch.Tensor) -> dict:
    t = t.detach().cpu()
    out = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
           "sha256": hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                                    if t.numel() else b"").hexdigest()[:16]}
    if t.is_floating_point() and t.numel():
        x = t.double().flatten()
        finite = x[x.isfinite()]
        w = torch.linspace(-1, 1, len(x), dtype=torch.float64)  # order-sensitive, not bit-sensitive
        out["stats"] = {"nan": int(x.isnan().sum()), "sum": float(finite.sum()),
                        "abs": float(finite.abs().sum()), "weighted": float((x.nan_to_num(0.0) * w).sum()),
                        "min": float(finite.min()) if len(finite) else 0.0,
                        "max": float(finite.max()) if len(finite) else 0.0}
    return out


def describe(cache_dir: Path) -> dict:
    """``{relative file name: {"key", "attributes", "tensors"}}`` of every entry under ``cache_dir``."""
    from selfrepair.results import load_tensors

    out = {}
    for path in sorted(Path(cache_dir).glob("*/*.safetensors")):
        tensors, meta = load_tensors(path)
        out[path.relative_to(cache_dir).as_posix()] = {
            "result": meta.get("result"), "key": meta.get("key"), "attributes": meta.get("attributes"),
            "tensors": {name: _summary(t) for name, t in sorted(tensors.items())}}
    return out


def build(cache_dir: Path) -> dict:
    """Every chapter of the tiny profile measured into ``cache_dir`` (``selfrepair measure``)."""
    from selfrepair.book import load_profile
    from selfrepair.book.precompute import measure_chapters

    params = {**load_profile("tiny", ROOT), "cache_dir": str(Path(cache_dir).resolve())}
    measure_chapters(ROOT, params, progress=False)
    return describe(cache_dir)


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(1.0, abs(b), scale)


def _timeless(value):
    """``value`` without wall times (``seconds_*`` attributes: AtP's cost), which differ every run."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if not k.startswith("seconds")}
    return value


def differences(got: dict, want: dict) -> list[str]:
    """What differs between two descriptions, one line each (empty: the same cache)."""
    out = [f"entry {n} is new" for n in sorted(set(got) - set(want))]
    out += [f"entry {n} is gone" for n in sorted(set(want) - set(got))]
    for name in sorted(set(got) & set(want)):
        g, w = got[name], want[name]
        for part in ("result", "key", "attributes"):
            if _timeless(g[part]) != _timeless(w[part]):
                out.append(f"{name}: its {part} differs")
        if set(g["tensors"]) != set(w["tensors"]):
            out.append(f"{name}: tensors {sorted(set(g['tensors']) ^ set(w['tensors']))} differ")
        for t in sorted(set(g["tensors"]) & set(w["tensors"])):
            a, b = g["tensors"][t], w["tensors"][t]
            if (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
                out.append(f"{name}/{t}: shape or dtype {a['shape']} {a['dtype']} != {b['shape']} {b['dtype']}")
            elif a["sha256"] != b["sha256"]:
                if "stats" not in b:
                    out.append(f"{name}/{t}: integer values differ")
                    continue
                scale = b["stats"]["abs"] / max(1, torch.Size(b["shape"]).numel())
                bad = [k for k in b["stats"] if not _close(a["stats"][k], b["stats"][k], scale)]
                if bad:
                    out.append(f"{name}/{t}: {', '.join(bad)} differ beyond {TOLERANCE} "
                               f"({ {k: (a['stats'][k], b['stats'][k]) for k in bad} })")
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build(Path(tmp))
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"{len(manifest)} entries written to {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
