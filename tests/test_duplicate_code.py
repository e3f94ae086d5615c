"""``mtkd/`` has no copied code: pylint's duplicate-code check (8 or more similar lines) is clean."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _similarities(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pylint", "--disable=all", "--enable=duplicate-code",
                           "--min-similarity-lines=8", "--score=n", *map(str, paths)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mtkd_has_no_duplicate_code() -> None:
    pytest.importorskip("pylint")
    proc = _similarities(ROOT / "mtkd")
    assert proc.returncode == 0 and "R0801" not in proc.stdout, proc.stdout[-4000:]


def test_the_check_finds_a_copied_function(tmp_path: Path) -> None:
    pytest.importorskip("pylint")
    body = "".join(f"    x{i} = a + {i} * b\n" for i in range(10)) + "    return x9\n"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("one", "two"):
        (pkg / f"{name}.py").write_text(f"def {name}(a, b):\n{body}")
    proc = _similarities(pkg)
    assert proc.returncode != 0 and "R0801" in proc.stdout
