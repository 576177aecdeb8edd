"""docs/walkthrough.md runs as written: every ```bash (and ```python) block, in
order, on the ``test`` preset, in a fresh directory; each command exits 0 and the
products the doc promises are there."""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest


def _load_doc_blocks():
    # test folders are not packages: load the extractor by path, once
    name = "_walkthrough_doc_blocks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_doc_blocks.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


blocks = _load_doc_blocks()
DOC = blocks.DOC


# ---------------------------------------------------------------- the extractor
SAMPLE = """\
# a doc
```bash
echo one
```
```text
one
```
<!-- not run in tests: needs a cluster -->
```bash
bps submit x.yaml
```
```python
print('two')
```
"""


def test_extractor_runs_bash_and_python_in_order_and_honours_skips():
    parsed = blocks.parse_blocks(SAMPLE)
    assert [(b.language, b.line, b.runs) for b in parsed] == [
        ("bash", 2, True), ("text", 5, False), ("bash", 9, False), ("python", 12, True),
    ]  # fmt: skip
    assert parsed[2].skip_reason == "needs a cluster"
    script = blocks.bash_script(SAMPLE)
    assert script.index("echo one") < script.index("print('two')")
    assert "bps submit" not in script and "one\n```" not in script


def test_extractor_refuses_a_skip_without_reason_and_an_open_fence():
    with pytest.raises(blocks.DocFormatError, match="must say why"):
        blocks.parse_blocks("<!-- not run in tests -->\n```bash\nls\n```\n")
    with pytest.raises(blocks.DocFormatError, match="never closed"):
        blocks.parse_blocks("text\n```bash\nls\n")


def test_script_stops_at_the_first_failing_command(tmp_path):
    import subprocess

    doc = "```bash\ntrue\nfalse\necho after\n```\n"
    (tmp_path / "s.sh").write_text(blocks.bash_script(doc))
    result = subprocess.run(["bash", "s.sh"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "after" not in result.stdout
    assert "WALKTHROUGH FAILED at doc line 1: false" in result.stderr


# ---------------------------------------------------------------- the doc itself
def test_doc_skips_only_the_setup_and_bps_blocks():
    skipped = [b for b in blocks.parse_blocks(DOC.read_text()) if b.skip_reason]
    assert [b.code.split()[0] for b in skipped] == ["./dev", "bps", "make_apdb.py"], skipped
    assert all("bps" in b.code or "./dev setup" in b.code for b in skipped)


def test_doc_pipeline_file_is_the_demos():
    """The doc's My-DC2-ApPipe.yaml is the one `diapipe demo` writes (same text, its own APDB)."""
    from diapipe.demo import MY_APPIPE_TEMPLATE

    text = DOC.read_text()
    body = re.search(r"cat > My-DC2-ApPipe.yaml <<EOF\n(.*?)\nEOF\n", text, re.DOTALL).group(1) + "\n"
    written = body.replace("\\$", "$").replace("$PWD", "/work")
    assert written == MY_APPIPE_TEMPLATE.format(db_url="sqlite:////work/run1.db")


def test_doc_commands_exist_for_every_guide_step():
    """The guide's commands, in the guide's order, are in the doc's run blocks."""
    script = blocks.bash_script(DOC.read_text())
    order = [
        "diapipe simulate $REPO",
        'butler query-collections $REPO --chains=tree "2.2i/defaults"',
        "butler query-data-ids $REPO tract patch visit",
        "cat $AP_PIPE_DIR/pipelines/LsstCamImSim/ApTemplate.yaml",
        "pipetask build -p $AP_PIPE_DIR/pipelines/LsstCamImSim/ApTemplate.yaml --pipeline-dot",
        "dot ApTemplate.dot -Tpng > ApTemplate.png",
        "pipetask run -j 1 -b $REPO",
        "cat $AP_PIPE_DIR/pipelines/LsstCamImSim/ApPipe.yaml",
        "make_apdb.py -c isolation_level=READ_UNCOMMITTED",
        "pipetask build -p My-DC2-ApPipe.yaml --pipeline-dot My-DC2-ApPipe.dot",
        "-p My-DC2-ApPipe.yaml --register-dataset-types",
        '--datasets "goodSeeingDiff_diaSrcTable"',
        "butler.get('goodSeeingDiff_diaSrcTable'",
        '"validityEndMjdTai" is NULL',
        "diapipe metrics $REPO",
        "diapipe report $REPO",
    ]
    positions = [script.find(needle) for needle in order]
    assert -1 not in positions, [n for n, p in zip(order, positions) if p == -1]
    assert positions == sorted(positions)


# ---------------------------------------------------------------- the run
@pytest.mark.slow
def test_walkthrough_runs_end_to_end(walkthrough_run):
    work = walkthrough_run.work
    print(f"docs/walkthrough.md ran in {walkthrough_run.seconds:.0f} s")
    for name in ("ApTemplate.png", "My-DC2-ApPipe.png", "diaObjects_sky.png"):
        assert (work / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with sqlite3.connect(work / "run1.db") as connection:
        n_sources = connection.execute('SELECT COUNT(*) FROM "DiaSource"').fetchone()[0]
        current = connection.execute(
            'SELECT COUNT(*), SUM("nDiaSources") FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL'
        ).fetchone()
    # every DiaSource belongs to exactly one current DiaObject
    assert n_sources > 0 and current[0] > 0
    assert current[1] == n_sources
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics
    html = (work / "report" / "index.html").read_text()
    assert "DIA" in html and "<img" in html
