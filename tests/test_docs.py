"""The API reference builds without a warning, documents every public name, its examples run as written, and no
page names a private module; the tutorial notebook is executed into its page, and a failing cell fails the build."""

import glob
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "api", "*.md")))
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
README = os.path.join(ROOT, "README.md")
# The tutorial: a jupytext notebook that mkdocs-jupyter executes at build time.
TUTORIAL = os.path.join(ROOT, "docs", "tutorial.py")
# The public namespaces, each with its page of the API reference (``attrjax`` itself: the front door).
NAMESPACES = ("attrjax", "attrjax.attribution", "attrjax.models", "attrjax.training", "attrjax.evaluation",
              "attrjax.metrics", "attrjax.pruning", "attrjax.quantization", "attrjax.data", "attrjax.distributed",
              "attrjax.utils")
# A dotted (or file) path into attrjax with a component that starts with one underscore: a private module or name.
PRIVATE_PATH = re.compile(r"\battrjax(?:[./]\w+)*[./]_(?!_)\w*")
# What the tutorial's kernel (ipykernel >= 7.4) says on its stderr when it talks to mkdocs-jupyter over local TCP
# sockets without CurveZMQ keys: a notice of the kernel's, not a warning of the build.
KERNEL_NOTICE = re.compile(r"^\[IPKernelApp\] WARNING \| Kernel is running over TCP without encryption\..*\n?", re.M)


def _directive_blocks(text: str) -> list[re.Match]:
    """Every ``::: module`` block of a page's text, with its indented options (group 2)."""
    return list(re.finditer(r"^::: (\S+)\n((?:    .*\n)*)", text, flags=re.M))


def _python_blocks(text: str) -> list[re.Match]:
    return list(re.finditer(r"```python\n(.*?)```", text, flags=re.S))


def _page_path(page: str) -> str:
    """The built page of ``docs/api/<name>.md`` under the site directory (``index.md`` is its folder's page)."""
    name = os.path.basename(page)[:-3]
    return os.path.join("api", "" if name == "index" else name, "index.html")


def _directives(page: str) -> list[tuple[str, list[str] | None]]:
    """``(module, members or None)`` of every ``::: module`` block of a page."""
    text = open(page).read()
    found = []
    for match in _directive_blocks(text):
        members = re.search(r"members: \[(.*)\]", match.group(2))
        found.append((match.group(1), [m.strip() for m in members.group(1).split(",")] if members else None))
    return found


def _public_names(module_name: str) -> list[str]:
    """``__all__``, or the functions and classes the module itself defines (not imports)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items() if not name.startswith("_")
            and (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module_name]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in KERNEL_NOTICE.sub("", result.stderr), result.stderr
    return site_dir


def test_every_page_of_the_navigation_is_built(site):
    nav = re.findall(r":\s+(\S+\.md)$", open(os.path.join(ROOT, "mkdocs.yml")).read(), flags=re.M)
    assert len(nav) >= 20
    for page in nav:
        name = re.sub(r"(^|/)(index|README)$", "", page[:-3])  # index.md and README.md are their folder's page
        assert os.path.exists(os.path.join(site, name, "index.html")), page


def test_the_tutorial_page_holds_the_executed_notebook(site):
    """The tutorial comes right after Home, and its page shows what running it produced: its figures as embedded
    PNGs and the evaluation table it prints, one row per network."""
    nav = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")))["nav"]
    assert nav[:2] == [{"Home": "index.md"}, {"Tutorial: your own model": "tutorial.py"}], nav[:2]
    html = open(os.path.join(site, "tutorial", "index.html")).read()
    # the notebook's figures: <img> tags with embedded PNGs (the page's CSS embeds small PNG icons too)
    figures = len(re.findall(r'<img\b[^>]*\bsrc="data:image/png;base64,', html))
    assert figures >= 3, f"{figures} embedded PNG figures on the tutorial page: was the notebook executed?"
    assert re.search(r"\|\s*model\s*\|\s*params\s*\|.*\|\s*cos\. to teacher\s*\|", html), "no evaluation table"
    for network in ("teacher", "student (KD)", "student (KD + matching)"):
        # the network's row: its name, then parameter count, sample mAP, ... and its cosine to the teacher (a number)
        row = r"\|\s*" + re.escape(network) + r"\s*\|\s*[\d,]+\s*\|(\s*([\d.]+|nan)\s*\|){6}"
        assert re.search(row, html), f"no row for {network} in the evaluation table"
    assert "Traceback" not in html


def test_a_failing_tutorial_cell_fails_the_build(tmp_path):
    """With the site's own mkdocs-jupyter settings, a notebook whose cell raises stops the build (mkdocs-jupyter's
    default, allow_errors, would render the traceback into the page and build on)."""
    config = yaml.safe_load(open(os.path.join(ROOT, "mkdocs.yml")))
    options = next(plugin["mkdocs-jupyter"] for plugin in config["plugins"]
                   if isinstance(plugin, dict) and "mkdocs-jupyter" in plugin)
    assert options["execute"] and options["allow_errors"] is False, options
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# home\n")
    broken = '# %%\nprint("before")\n\n# %%\nraise RuntimeError("a broken cell")\n'
    (tmp_path / "docs" / "tutorial.py").write_text(broken)
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump({
        "site_name": "broken", "theme": {"name": config["theme"]["name"]}, "strict": True,
        "plugins": [{"mkdocs-jupyter": options}], "nav": [{"Home": "index.md"}, {"Tutorial": "tutorial.py"}]}))
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "a broken cell" in result.stdout + result.stderr


def _target(dotted: str):
    """The module a ``::: dotted`` block documents, or the object (``attrjax.models.vgg``: a function)."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module_name, name = dotted.rsplit(".", 1)
        return getattr(importlib.import_module(module_name), name)


def test_the_front_door_comes_first_and_every_namespace_has_its_page():
    nav = re.findall(r":\s+(api/\S+\.md)$", open(os.path.join(ROOT, "mkdocs.yml")).read(), flags=re.M)
    assert nav[0] == "api/index.md", nav
    assert sorted(nav) == sorted(os.path.relpath(page, os.path.join(ROOT, "docs")) for page in PAGES)
    documented = {dotted for page in PAGES for dotted, _ in _directives(page)}
    assert not [namespace for namespace in NAMESPACES if namespace not in documented]
    assert [dotted for dotted, _ in _directives(os.path.join(ROOT, "docs", "api", "index.md"))] == ["attrjax"]


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_every_public_name_has_its_entry(site, page):
    html = open(os.path.join(site, _page_path(page))).read()
    anchors = set(re.findall(r'id="(attrjax[\w.]*)"', html))
    directives = _directives(page)
    assert directives, f"{page} documents no module"
    modules = [dotted for dotted, _ in directives]
    for dotted, members in directives:
        if not inspect.ismodule(_target(dotted)):
            assert dotted in anchors, f"{dotted} has no entry in {page}"
            continue
        for name in members or _public_names(dotted):
            # Under its public path, or under another module of the same page: the names ``attrjax.data``
            # exports lazily from ``attrjax.data.builder`` are documented there.
            assert any(f"{module}.{name}" in anchors for module in modules), \
                f"{dotted}.{name} has no entry in {page} (no docstring?)"


def _private_names(text: str, *, prose: bool) -> list[str]:
    """``line N: ...`` for every private attrjax path in the page's ``python`` blocks and ``:::`` directives (and,
    with ``prose``, anywhere in it), and every private name a block imports from attrjax."""
    spans = [match.span(1) for match in _python_blocks(text)] + [match.span() for match in _directive_blocks(text)]
    if prose:
        spans = [(0, len(text))]
    found = []
    for start, end in spans:
        part = text[start:end]
        hits = [match.start() for match in PRIVATE_PATH.finditer(part)]
        for match in re.finditer(r"\bfrom\s+attrjax[\w.]*\s+import\s+(\([^)]*\)|[^\n]*)", part):
            names = [name.split(" as ")[0].strip() for name in match.group(1).strip("()").split(",")]
            if any(name.startswith("_") for name in names):
                hits.append(match.start())
        for match in re.finditer(r"members:\s*\[([^\]]*)\]", part):
            if any(name.strip().startswith("_") for name in match.group(1).split(",")):
                hits.append(match.start())
        for hit in sorted(set(hits)):
            line = text.count("\n", 0, start + hit) + 1
            found.append(f"line {line}: {text.splitlines()[line - 1].strip()}")
    return found


@pytest.mark.parametrize("page", DOCS + [TUTORIAL, README], ids=lambda page: os.path.relpath(page, ROOT))
def test_no_page_names_a_private_module(page):
    """Users read the public API only: no example imports from, and no ``:::`` block documents, a module or name
    whose name starts with ``_``; nor does the documentation's prose cite one."""
    found = _private_names(open(page).read(), prose=page != README)
    assert not found, f"{os.path.relpath(page, ROOT)} names private attrjax modules:\n" + "\n".join(found)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_the_example_runs(page):
    blocks = re.findall(r"```python\n(.*?)```", open(page).read(), flags=re.S)
    assert blocks, f"{page} has no example"
    namespace = {}
    for block in blocks:
        exec(compile(block, page, "exec"), namespace)  # noqa: S102 - the page's own example
