"""Shared by the report.html tests: an 80-layer model generator, an independent HTML parser, and the headless
Chromium used by the browser tests (Debian's chromium + chromedriver; never downloaded)."""

import importlib.util
import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CATEGORIES = ("shared", "adapter-only", "cast-artifact", "unexplained", "unchanged")
LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


# ---------------------------------------------------------------- an 80-layer model, generated

def layer_kinds(hidden: int) -> list:
    """The 16 tensors of a StarCoder2 block (biases everywhere), with a small hidden size."""
    kv = hidden // 2
    return [("self_attn.q_proj.weight", (hidden, hidden)), ("self_attn.q_proj.bias", (hidden,)),
            ("self_attn.k_proj.weight", (kv, hidden)), ("self_attn.k_proj.bias", (kv,)),
            ("self_attn.v_proj.weight", (kv, hidden)), ("self_attn.v_proj.bias", (kv,)),
            ("self_attn.o_proj.weight", (hidden, hidden)), ("self_attn.o_proj.bias", (hidden,)),
            ("mlp.c_fc.weight", (4 * hidden, hidden)), ("mlp.c_fc.bias", (4 * hidden,)),
            ("mlp.c_proj.weight", (hidden, 4 * hidden)), ("mlp.c_proj.bias", (hidden,)),
            ("input_layernorm.weight", (hidden,)), ("input_layernorm.bias", (hidden,)),
            ("post_attention_layernorm.weight", (hidden,)), ("post_attention_layernorm.bias", (hidden,))]


def write_layered_model(root: Path, layers: int = 80, hidden: int = 16, rank: int = 4) -> dict:
    """ROOT/base (layers × 16 + 3 fp32 tensors, small random weights) and ROOT/adapter (LoRA r=rank on q/k/v/o)."""
    rng = np.random.default_rng(80)
    (root / "base").mkdir(parents=True)
    (root / "adapter").mkdir()
    shapes = [("model.embed_tokens.weight", (64, hidden))]
    shapes += [(f"model.layers.{i}.{kind}", shape) for i in range(layers) for kind, shape in layer_kinds(hidden)]
    shapes += [("model.norm.weight", (hidden,)), ("model.norm.bias", (hidden,))]
    base = {n: torch.from_numpy((0.02 * rng.standard_normal(s)).astype(np.float32)) for n, s in shapes}
    save_file(base, str(root / "base" / "model.safetensors"), metadata={"format": "pt"})
    (root / "base" / "config.json").write_text(json.dumps({
        "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "hidden_size": hidden,
        "intermediate_size": 4 * hidden, "num_hidden_layers": layers, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 64, "use_bias": True, "tie_word_embeddings": True}))
    factors = {}
    for i in range(layers):
        for t in TARGETS:
            out = base[f"model.layers.{i}.self_attn.{t}.weight"].shape[0]
            key = f"base_model.model.model.layers.{i}.self_attn.{t}"
            factors[f"{key}.lora_A.weight"] = torch.from_numpy((0.05 * rng.standard_normal((rank, hidden))).astype(np.float32))
            factors[f"{key}.lora_B.weight"] = torch.from_numpy((0.01 * rng.standard_normal((out, rank))).astype(np.float32))
    save_file(factors, str(root / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "task_type": "CAUSAL_LM"}))
    return {"base": root / "base", "adapter": root / "adapter"}


# ---------------------------------------------------------------- outputs shared by the report tests

def _validated_once(tmp_path_factory, name: str, argv) -> Path:
    """`loratv validate ARGV -o BASETEMP/NAME`, run once per session whichever test module asks first (a fixture
    imported into two modules would be two fixtures); the folder is read only."""
    from loratv.cli.app import main

    out = tmp_path_factory.getbasetemp() / name / "validation_results"
    if not (out / "report.html").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        assert main([*map(str, argv), "-o", str(out), "--quiet", "--force"]) == 0
    return out


def example_validation(tmp_path_factory) -> Path:
    """`loratv validate --precision fp16` on the embedded example."""
    return _validated_once(tmp_path_factory, "report-example", ["validate", "--precision", "fp16"])


def layered_validation(tmp_path_factory) -> Path:
    """`loratv validate --precision fp16` on a generated 80-layer model (80 × 16 + 3 = 1,283 tensors)."""
    root = tmp_path_factory.getbasetemp() / "report-80-layers"
    if not (root / "model").is_dir():
        write_layered_model(root / "model")
    return _validated_once(tmp_path_factory, "report-80-layers", [
        "validate", "--base", root / "model" / "base", "--adapter", root / "model" / "adapter", "--precision", "fp16"])


# ---------------------------------------------------------------- reading the page without loratv

class Page(HTMLParser):
    """The parts of report.html the tests check: tags with attributes, text by element id, table rows, headings."""

    VOID = {"meta", "img", "br", "input", "link", "hr", "source", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags = []  # (tag, attrs dict)
        self.headings = []  # (level, text)
        self.text_by_id = {}
        self.tables = {}  # table id -> list of rows, each (row attrs, [cell texts])
        self._stack = []  # open elements: (tag, attrs, text parts)
        self._tables = []  # open tables: id
        self._text = []
        self.feed(text)
        self.text = " ".join("".join(self._text).split())  # the document's text, entities decoded

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._tables.append(attrs.get("id"))
            self.tables.setdefault(attrs.get("id"), [])
        if tag == "tr" and self._tables and self._in("tbody"):
            self.tables[self._tables[-1]].append((attrs, []))
        if tag == "br" and self._stack:
            self._stack[-1][2].append(" ")
        if tag not in self.VOID:
            self._stack.append((tag, attrs, []))

    def _in(self, tag):
        return any(t == tag for t, _, _ in self._stack)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self._stack:
            t, attrs, parts = self._stack.pop()
            text = " ".join("".join(parts).split())
            if self._stack:
                self._stack[-1][2].append("".join(parts))
            if "id" in attrs:
                self.text_by_id[attrs["id"]] = text
            if t in ("h1", "h2", "h3", "h4", "h5", "h6"):
                self.headings.append((int(t[1]), text))
            if t in ("td", "th") and self._tables and self.tables[self._tables[-1]] and self._in("tbody"):
                self.tables[self._tables[-1]][-1][1].append(text)
            if t == "table":
                self._tables.pop()
            if t == tag:
                break

    def handle_data(self, data):
        if not any(t in ("script", "style") for t, _, _ in self._stack):
            self._text.append(data)
        if self._stack:
            self._stack[-1][2].append(data)

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


# ---------------------------------------------------------------- the browser

APT_INSTALL = "apt-get install chromium chromium-driver"


def _executable(env: str, names) -> tuple:
    """(path, None) when found; (None, why) when not: $env names a missing file, or no name is on the PATH."""
    given = os.environ.get(env)
    if given:
        if os.path.isfile(given) and os.access(given, os.X_OK):
            return given, None
        return None, f"${env}={given} is not an executable file"
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    return (found, None) if found else (None, f"{names[0]} is not installed (not on the PATH)")


def chromium_status():
    """((browser, driver) paths, None) when the browser test can run, else (None, the exact reason in one line)."""
    problems = []
    if importlib.util.find_spec("selenium") is None:
        problems.append("selenium is not installed (pip install -e '.[test]')")
    browser, why_browser = _executable("LORATV_CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
    driver, why_driver = _executable("LORATV_CHROMEDRIVER", ("chromedriver",))
    missing = [w for w in (why_browser, why_driver) if w]
    if missing:
        present = ""
        if len(missing) == 1:
            present = f" (chromium is, at {browser})" if browser else f" (chromedriver is, at {driver})"
        problems.append(" and ".join(missing) + present + f"; install with `{APT_INSTALL}`")
    if problems:
        return None, "; ".join(problems)
    return (browser, driver), None


def find_chromium():
    """(browser, driver) paths from $LORATV_CHROMIUM / $LORATV_CHROMEDRIVER or the PATH, else None."""
    return chromium_status()[0]


def require_chromium():
    """Skip without a browser, saying exactly what is missing, unless in CI ($CI set), where it is a failure."""
    found, reason = chromium_status()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the browser test cannot run: {reason}")
        pytest.skip(f"browser test: {reason}")
    return found


def start_chromium(paths, *, javascript: bool = True, width: int = 1440, height: int = 1000):
    """Headless Chromium logging every network event of the page (Chrome performance log)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", f"--window-size={width},{height}"):
        options.add_argument(arg)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.add_experimental_option("perfLoggingPrefs", {"enableNetwork": True, "enablePage": False})
    return webdriver.Chrome(service=Service(driver), options=options)


def requested_urls(driver) -> list:
    """Every URL the page asked for since the last call (Network.requestWillBeSent in the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def artifacts_dir() -> Path:
    """Where screenshots go: $LORATV_TEST_ARTIFACTS, else test-artifacts/ in the repository (git-ignored)."""
    folder = Path(os.environ.get("LORATV_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def full_page_screenshot(driver, path: Path, width: int = 1440) -> None:
    """The whole page, not only the viewport (DevTools' captureBeyondViewport)."""
    import base64

    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    Path(path).write_bytes(base64.b64decode(shot["data"]))


# ---------------------------------------------------------------- record builders (schema loratv.comparison)

def example_category(name: str) -> str:
    """q/k/v/o weights shared (one adapter-only), two unexplained, layer-norm biases unchanged, the rest cast."""
    if name == "model.layers.29.self_attn.o_proj.weight":
        return "adapter-only"
    if re.search(r"_proj\.weight$", name) and "self_attn" in name:
        return "shared"
    if name in ("model.layers.3.mlp.c_fc.weight", "model.layers.17.mlp.c_fc.weight"):
        return "unexplained"
    if name.endswith("layernorm.bias") or name == "model.norm.bias":
        return "unchanged"
    return "cast-artifact"


def tensor_entry(rng, name, shape, category):
    match = LAYER.search(name)
    layer, kind = (None, name) if match is None else (int(match.group(1)), name[match.end():])
    params = int(np.prod(shape))
    base = float(rng.uniform(0.5, 5.0))
    shared, targeted = category == "shared", category in ("shared", "adapter-only")
    changed = category in ("shared", "cast-artifact", "unexplained")
    tv = base * 10 ** rng.uniform(-3, -1) if shared else base * 10 ** rng.uniform(-5, -3) if changed else 0.0
    lora = tv * (1 + 1e-7 * rng.standard_normal()) if shared else 10 ** rng.uniform(-4, -2) if targeted else 0.0
    cosine = 1 - 10 ** rng.uniform(-15, -10) if shared else None
    max_t = 3 * tv / math.sqrt(params)
    diff = 10 ** rng.uniform(-10, -8) if shared else 3 * lora / math.sqrt(params) if targeted else max_t
    return {
        "name": name, "shape": list(shape), "parameters": params, "layer": layer, "kind": kind,
        "category": category, "targeted": targeted, "changed": changed,
        "base_dtype": "F32", "finetuned_dtype": "F16",
        "adapter_modules": [f"base_model.model.{name.removesuffix('.weight')}"] if targeted else [],
        "rank": 8 if targeted else None, "cosine": cosine, "dot": cosine * tv * lora if shared else 0.0,
        "task_vector_norm": tv, "lora_delta_norm": lora, "base_norm": base, "max_abs_task_vector": max_t,
        "max_abs_diff": diff, "relative_frobenius_error": 10 ** rng.uniform(-9, -7) if shared else None,
        "certificate_ratio": float(rng.uniform(0.01, 0.9)) if targeted else None,
        "max_error_ulps": float(rng.uniform(0.1, 0.5)) if targeted else None,
        "changed_elements": params if changed else 0,
        "vanished_elements": int(rng.integers(0, 3)) if targeted else 0,
        "cast_dtype": "F16" if category == "cast-artifact" else None,
    }


def summarise(tensors, tolerance):
    def count(cat):
        return sum(t["category"] == cat for t in tensors), sum(t["parameters"] for t in tensors if t["category"] == cat)

    counts = {c: count(c)[0] for c in CATEGORIES}
    parameters = {c: count(c)[1] for c in CATEGORIES}
    counts["tv-only"] = counts["cast-artifact"] + counts["unexplained"]
    parameters["tv-only"] = parameters["cast-artifact"] + parameters["unexplained"]
    targeted = [t for t in tensors if t["targeted"]]
    shared = [t["cosine"] for t in tensors if t["category"] == "shared"]
    unexplained = [t for t in tensors if t["category"] == "unexplained"]

    def cosine(ts):
        tt, ll = sum(t["task_vector_norm"] ** 2 for t in ts), sum(t["lora_delta_norm"] ** 2 for t in ts)
        return sum(t["dot"] for t in ts) / math.sqrt(tt * ll) if tt and ll else None

    certs = [t["certificate_ratio"] for t in targeted]
    certified = all(c <= 1 for c in certs) and not unexplained
    within = all(t["max_abs_diff"] <= tolerance for t in targeted + unexplained)
    tv2 = sum(t["task_vector_norm"] ** 2 for t in targeted)
    err2 = sum((t["relative_frobenius_error"] or 0) ** 2 * t["task_vector_norm"] ** 2 for t in targeted)
    worst = sorted(targeted, key=lambda t: -t["certificate_ratio"])[:5] + unexplained
    return {
        "verdict": ("EQUIVALENT (certified)" if certified else "EQUIVALENT within tolerance" if within
                    else "NOT EQUIVALENT"),
        "certified": certified, "within_tolerance": within,
        "reasons": [] if certified else [f"{len(unexplained)} changed tensors are neither targeted nor cast artifacts, "
                                         f"e.g. {unexplained[0]['name']}"],
        "counts": counts, "parameters": parameters,
        "total_tensors": len(tensors), "total_parameters": sum(t["parameters"] for t in tensors),
        "targeted_tensors": len(targeted), "targeted_parameters": sum(t["parameters"] for t in targeted),
        "changed_tensors": sum(t["changed"] for t in tensors),
        "changed_parameters": sum(t["parameters"] for t in tensors if t["changed"]),
        "adapter_stored_parameters": sum(8 * sum(t["shape"]) for t in targeted),
        "global_cosine": cosine(tensors), "targeted_cosine": cosine(targeted),
        "mean_cosine": sum(shared) / len(shared) if shared else None, "min_cosine": min(shared, default=None),
        "perfect_matches": sum(c > 0.9999 for c in shared), "perfect_match_threshold": 0.9999,
        "max_abs_diff": max((t["max_abs_diff"] for t in targeted), default=None),
        "max_certificate_ratio": max(certs, default=None),
        "relative_frobenius_error": math.sqrt(err2 / tv2) if tv2 else None,
        "worst_tensors": [t["name"] for t in worst][:5],
    }


def make_record(shapes, category=example_category, seed=0):
    rng = np.random.default_rng(seed)
    tensors = [tensor_entry(rng, name, shape, category(name)) for name, shape in shapes]
    tolerance = 1e-3
    return {
        "schema": "loratv.comparison", "schema_version": 1, "loratv_version": "0.1.0",
        "inputs": {"base": "example/base", "adapter": "example/adapter", "task_vector": None,
                   "finetuned": "merged_model_fp16",
                   "adapter_config": {"r": 8, "lora_alpha": 16, "use_rslora": False,
                                      "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
                                      "modules_to_save": None, "bias": "none"}},
        "tolerance": tolerance,
        "command": "loratv compare --base example/base --adapter example/adapter --finetuned merged_model_fp16",
        "summary": summarise(tensors, tolerance), "tensors": tensors,
        "notes": ["lm_head is tied to model.embed_tokens.weight", "fine-tuned tensors are F16"],
    }
