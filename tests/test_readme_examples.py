"""Every documented example runs: README.md's code blocks and the CLI's help.

The blocks are read from README.md when the tests are collected, so a changed README changes
what runs here. A test machine has no trained ResNet-20, no board and two busy cores, so each
example runs with the explicit substitutions below; every ``old`` string is asserted to be in
its block, so a README that drifts fails here instead of silently running something else.

* ``json`` blocks parse; the one under "### Policy JSON" is a valid policy of the untrained
  zoo ResNet-20 (its layer and block names) and applies to it.
* the ``python`` SDK block is executed as written (after ``SDK_SUBSTITUTIONS``) against a real
  server (uvicorn on 127.0.0.1, SQLite and PostgreSQL); the job must succeed and the export
  must write an ONNX file. The ``model.pt2`` it uploads is a small CNN trained here.
* every ``modeltailor ...`` line of the CLI ``bash`` block runs as a subprocess (after
  ``CLI_SUBSTITUTIONS``, in a folder holding ``FIXTURE_FILES`` under the README's names) and
  must exit 0 and print / write what its comment says (``CLI_CHECKS``); a command that cannot
  run here is in ``HELP_ONLY`` with the reason, and its ``--help`` must list the README's flags.
* ``modeltailor --help`` and every subcommand's ``--help`` exit 0, and the JSON examples in
  option help texts run.
* the set-up block (``bash scripts/demo.sh``, ``bash scripts/test.sh``) is not run here: CI
  runs both. It must name exactly those two scripts, and they must exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db.testing import BACKENDS, fresh_database
from tests.live import modeltailor_cmd, run_app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# --- substitutions: (README text, what runs instead, why) -------------------------------------

SDK_SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ('Client("http://127.0.0.1:8000")', "Client(SERVER_URL)", "the test server's free port"),
    ('c.builtin_dataset("mnist")', 'c.builtin_dataset("digits")', "8x8 digits: the tiny model trains in 1 s"),
    (
        'budget={"candidates": 100})',
        'budget={"candidates": 6}, calibration_samples=8)',
        "6 candidates, and 8 instead of 48 measured models for the device's first predictor",
    ),
    ("job.wait()", "job.wait(timeout=600, poll_s=0.5, progress=False)", "a hung job fails the test"),
]
# The SDK block's API key comes from the documented default: $MODELTAILOR_DATA_DIR/local_api_key
# (the test points MODELTAILOR_DATA_DIR at the server's data directory).

CLI_SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ("compress resnet20", "compress lenet5", "LeNet-5 trains in seconds; ResNet-20 takes minutes"),
    ("--data mnist", "--data digits", "1,257 training images instead of 7,000"),
    ("--samples 200", "--samples 8", "8 measured models instead of 200"),
    ("--samples 48", "--samples 8", "8 measured models instead of 48"),
    ("--budget 100", "--budget 4", "4 candidates instead of 100"),
]

# Files the examples name, created in the working folder under the README's names.
FIXTURE_FILES: dict[str, str] = {
    "model.pt2": "a small CNN for 8x8 images trained on data.npz, saved with compression.model_io.save_pt2",
    "data.npz": "sklearn's digits as x_train, y_train, x_val, y_val: N x H x W float32 in [0, 1]",
    "half.json": 'the policy {"default": {"width": 0.5}}',
}

# Commands that cannot run on a test machine: only their --help runs (and must list the flags).
HELP_ONLY: dict[str, str] = {
    "device-agent": "runs until stopped, next to a board's runtime, against a server with a key "
    "($KEY); tests/latency_models covers the agent against a real server",
}

# The set-up block: not run here (CI runs both, scripts/test.sh is CI's entry point).
SETUP_COMMANDS = ["bash scripts/demo.sh", "bash scripts/test.sh"]


# --- README blocks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    heading: str  # the nearest heading above the block
    text: str


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    heading = ""
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            lang = line[3:].strip()
            end = i + 1
            while not lines[end].startswith("```"):
                end += 1
            blocks.append(Block(lang, heading, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return blocks


def the_block(lang: str, heading: str) -> Block:
    found = [b for b in readme_blocks() if b.lang == lang and b.heading == heading]
    assert len(found) == 1, f"README.md should have one ```{lang} block under {heading!r}, has {len(found)}"
    return found[0]


def substitute(text: str, table: list[tuple[str, str, str]]) -> str:
    for old, new, _why in table:
        assert old in text, f"README example changed: {old!r} is no longer in it; update the substitutions"
        text = text.replace(old, new)
    return text


def _drop_optional_brackets(line: str) -> str:
    """``cmd [--flag 'x[1]']`` -> ``cmd --flag 'x[1]'``: brackets outside quotes that open at ``[--``."""
    out: list[str] = []
    quote: str | None = None
    depth = 0  # open optional groups
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[" and line.startswith("--", i + 1):
            depth += 1
            continue
        elif ch == "]" and depth:
            depth -= 1
            continue
        out.append(ch)
    assert depth == 0 and quote is None, f"unbalanced example line: {line}"
    return "".join(out)


def command_lines(block: str) -> list[list[str]]:
    """The commands of a bash block: continuations joined, comments and optional brackets dropped."""
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = shlex.split(_drop_optional_brackets(line), comments=True)
        if words:
            commands.append(words)
    return commands


def cli_block() -> Block:
    return the_block("bash", "Without a server: the CLI")


def cli_commands() -> list[list[str]]:
    commands = command_lines(substitute(cli_block().text, CLI_SUBSTITUTIONS))
    assert commands and all(c[0] == "modeltailor" for c in commands), commands
    return commands


# --- fixtures -----------------------------------------------------------------------------------


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: two threads on two busy cores spin and run ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny_cnn(x: np.ndarray, y: np.ndarray, path: Path) -> Path:
    """A two-conv CNN for N x 1 x 8 x 8 images, trained a few epochs (val accuracy ~0.98)."""
    import torch
    from torch import nn

    from compression.model_io import save_pt2

    with _one_thread():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _epoch in range(15):
            for i in range(0, len(xt), 100):
                opt.zero_grad()
                nn.functional.cross_entropy(net(xt[i : i + 100]), yt[i : i + 100]).backward()
                opt.step()
        return save_pt2(net, xt[:2], path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding FIXTURE_FILES under the README's names (the CLI examples run in it)."""
    from sklearn.datasets import load_digits

    work = tmp_path_factory.mktemp("readme-cli")
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # N x H x W, float: kept as given
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n = 1400
    np.savez(work / "data.npz", x_train=x[:n], y_train=y[:n], x_val=x[n:], y_val=y[n:])
    train_tiny_cnn(x[:n, None], y[:n], work / "model.pt2")
    (work / "half.json").write_text(json.dumps({"default": {"width": 0.5}}))
    assert sorted(p.name for p in work.iterdir()) == sorted(FIXTURE_FILES)
    return work


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELTAILOR_")}
    env.update(MODELTAILOR_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", COLUMNS="200")
    return env


def modeltailor(*args: str) -> list[str]:
    """The console script users type, from this interpreter's environment."""
    script = Path(sys.executable).with_name("modeltailor")
    return [str(script), *args] if script.exists() else modeltailor_cmd(*args)


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        modeltailor(*args),
        cwd=cwd,
        env=cli_env(cwd / "data"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"modeltailor {shlex.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    )
    return done


# --- the set-up block ------------------------------------------------------------------------


def test_every_readme_block_is_covered() -> None:
    """A block of another language (or a new bash block) would run nowhere: cover it here first."""
    blocks = readme_blocks()
    assert {b.lang for b in blocks} == {"bash", "json", "python"}, [b.lang for b in blocks]
    bash = [b.heading for b in blocks if b.lang == "bash"]
    assert bash == ["modeltailor", "Without a server: the CLI"], bash
    assert [b.heading for b in blocks if b.lang == "python"] == ["The service"]


def test_the_setup_block_names_the_two_scripts() -> None:
    setup = the_block("bash", "modeltailor")  # the first block, under the title
    assert [shlex.join(c) for c in command_lines(setup.text)] == SETUP_COMMANDS
    for command in SETUP_COMMANDS:
        assert (ROOT / command.split()[1]).is_file(), command
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


# --- json blocks -----------------------------------------------------------------------------


def test_json_blocks_parse() -> None:
    blocks = [b for b in readme_blocks() if b.lang == "json"]
    assert blocks
    for block in blocks:
        json.loads(block.text)


def test_the_policy_json_is_a_policy_of_resnet20() -> None:
    """Its names (layer1.0.conv1, block layer2.1) are ResNet-20's: built untrained, no data needed."""
    import torch

    from compression.apply import apply_policy
    from compression.model_io import from_module
    from compression.policy import Policy
    from compression.space_builder import space_for
    from compression.zoo import build_model

    policy = Policy.from_json(the_block("json", "Policy JSON").text)
    module = build_model("resnet20", in_channels=1, image_size=28, num_classes=10)
    model = from_module(module.eval(), torch.randn(2, 1, 28, 28), "resnet20")
    space_for(model).validate(policy)
    assert policy.skip == {"layer2.1"} and policy.for_layer("layer1.0.conv1").nm == (2, 4)
    compressed = apply_policy(model, policy)
    out = compressed.gm(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


# --- the python SDK block ----------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def sdk_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The embedded default (API + runner + real search) on a fresh database: (URL, data dir)."""
    from service.app import create_app
    from service.settings import Settings

    with fresh_database(request.param, tmp_path) as db_url:
        settings = Settings(data_dir=tmp_path / "data", database_url=db_url, lease_s=10.0, poll_s=0.1)
        with run_app(create_app(settings, announce=lambda _msg: None)) as url:
            yield url, settings.data_dir


@pytest.mark.slow
def test_the_sdk_example_runs(
    sdk_server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compression.data import load_dataset

    url, data_dir = sdk_server
    code = substitute(the_block("python", "The service").text, SDK_SUBSTITUTIONS)
    digits = load_dataset("digits")  # what the server's builtin "digits" holds
    work = tmp_path / "work"
    work.mkdir()
    assert "model.pt2" in code
    train_tiny_cnn(digits.x_train, digits.y_train, work / "model.pt2")
    monkeypatch.chdir(work)
    monkeypatch.delenv("MODELTAILOR_API_KEY", raising=False)
    monkeypatch.delenv("MODELTAILOR_URL", raising=False)
    monkeypatch.setenv("MODELTAILOR_DATA_DIR", str(data_dir))  # the SDK's default key file
    scope: dict[str, Any] = {"SERVER_URL": url}
    exec(compile(code, f"{README}:python-block", "exec"), scope)

    info = scope["job"].status()
    assert info["status"] == "succeeded", info.get("error")
    assert info["spec"]["budget"]["candidates"] == 6 and len(scope["job"].candidates()) == 6
    best = scope["best"]
    assert best["feasible"] and info["baseline"]["accuracy"] - best["accuracy"] <= 0.01 + 1e-9
    onnx = work / "best.onnx"
    assert onnx.is_file() and onnx.stat().st_size > 1000
    import onnx as onnx_lib

    onnx_lib.checker.check_model(str(onnx))


# --- the CLI bash block --------------------------------------------------------------------------


def _one_json_line(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got:\n{done.stdout[-2000:]}"
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def check_space(args: list[str], done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """'The search space of a model: layers, their features and allowed choices, skippable blocks.'"""
    doc = _one_json_line(done)
    assert doc["layers"] and all({"name", "features", "schemes"} <= set(x) for x in doc["layers"])
    assert "blocks" in doc
    if "--options" in args:
        allowed = {"dense", *json.loads(_option(args, "--options")).get("schemes", [])}
        assert all(set(x["schemes"]) <= allowed for x in doc["layers"]), doc["layers"]


def check_compress(args: list[str], done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """'Apply one policy, ..., evaluate, export ONNX; prints one JSON line.'"""
    doc = _one_json_line(done)
    assert doc["int8"] == ("--int8" in args)
    assert 0 <= doc["accuracy"] <= 1 and doc["macs"] < doc["dense_macs"]  # width 0.5 prunes
    out = cwd / _option(args, "--out")
    assert doc["onnx"] == _option(args, "--out") and out.is_file() and out.stat().st_size > 1000


def check_calibrate(args: list[str], done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """'measures and fits; prints held-out errors' / with --model: 'prints their held-out error'."""
    assert "held-out:" in done.stdout and "MAPE" in done.stdout, done.stdout
    if "--model" in args:
        assert "of held-out policies within ±10 %" in done.stdout, done.stdout


def check_search(args: list[str], done: subprocess.CompletedProcess[str], cwd: Path) -> None:
    """'Search (progress bar), write the front.' Latency: the predictor calibrate just wrote."""
    front = json.loads((cwd / _option(args, "--out")).read_text())
    assert front["algorithm"] == _option(args, "--algorithm") and front["candidates"]
    assert isinstance(front["pareto"], list) and front["dense"]
    assert front["objective"]["max_accuracy_drop"] == float(_option(args, "--max-accuracy-drop"))
    assert front["latency_source"].startswith("predicted"), front["latency_source"]
    assert "on the Pareto front" in done.stderr


CLI_CHECKS: dict[str, Callable[[list[str], subprocess.CompletedProcess[str], Path], None]] = {
    "space": check_space,
    "compress": check_compress,
    "calibrate": check_calibrate,
    "search": check_search,
}


def _cli_ids() -> list[str]:
    return [f"{i}-{c[1]}" for i, c in enumerate(cli_commands())]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_cli_ids())), ids=_cli_ids())
def test_the_cli_example_runs(index: int, workspace: Path) -> None:
    """In README order (the search uses the predictor the calibrate lines wrote)."""
    args = cli_commands()[index][1:]
    command = args[0]
    if command in HELP_ONLY:
        help_text = run_cli([command, "--help"], workspace).stdout
        for flag in (a for a in args if a.startswith("--")):
            assert flag in help_text, f"README uses {flag} of {command}; its --help does not list it"
        return
    assert command in CLI_CHECKS, f"new README command {command!r}: add what it should print to CLI_CHECKS"
    for name in FIXTURE_FILES:
        assert name in cli_block().text, f"{name} is no longer in the README's CLI block"
    done = run_cli(args, workspace)
    CLI_CHECKS[command](args, done, workspace)


# --- CLI help ----------------------------------------------------------------------------------


def _command_tree() -> list[tuple[list[str], Any]]:
    import typer

    from modeltailor.cli import _register, app

    _register()

    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, cmd
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def _help(path: list[str], columns: str = "1000") -> str:
    from typer.testing import CliRunner

    from modeltailor.cli import app

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": columns})
    assert result.exit_code == 0, (path, result.output)
    return result.output


def test_modeltailor_help_runs() -> None:
    done = subprocess.run(modeltailor("--help"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for path, _cmd in _command_tree()[1:]:
        if len(path) == 1:
            assert path[0] in done.stdout, f"{path[0]} missing from modeltailor --help"


def test_every_subcommand_help_runs() -> None:
    tree = _command_tree()
    assert len(tree) > 15, [p for p, _ in tree]
    for path, _cmd in tree:
        text = _help(path)
        assert f"Usage: modeltailor {' '.join(path)}".rstrip() in text, text[:300]


EXAMPLE = re.compile(r"--options '(\{.*?\})'")


def _help_examples() -> list[tuple[list[str], str, str]]:
    """(command path, option, JSON example) for each `--options '...'` example in a command's help."""
    found = []
    for path, cmd in _command_tree():
        for example in EXAMPLE.findall(getattr(cmd, "help", None) or ""):
            found.append((path, "--options", example))
    return found


@pytest.mark.slow
def test_help_examples_run(workspace: Path) -> None:
    """The JSON examples of `space --options` and `search --options` run on the README's files."""
    examples = _help_examples()
    assert {(tuple(p), o) for p, o, _ in examples} == {(("space",), "--options"), (("search",), "--options")}
    for path, option, example in examples:
        json.loads(example)
        if path == ["space"]:
            args = [*path, "model.pt2", option, example]
            check_space(args, run_cli(args, workspace), workspace)
        else:  # a whole search: 2 candidates, latency by MACs (no device in the loop)
            args = [*path, "model.pt2", "--data", "data.npz", "--out", "help-front.json", "--budget", "2",
                    "--latency", "macs-proxy", option, example]  # fmt: skip
            run_cli(args, workspace)
            assert json.loads((workspace / "help-front.json").read_text())["candidates"]


@pytest.mark.parametrize("columns", ["60", "80", "1000"])
def test_help_shows_its_examples_verbatim(columns: str) -> None:
    """A user copies the example from --help at any terminal width: it must not be re-wrapped."""
    for path, _option_name, example in _help_examples():
        assert f"--options '{example}'" in _help(path, columns), (
            f"modeltailor {' '.join(path)} --help mangles {example}"
        )
