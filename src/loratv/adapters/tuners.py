"""PEFT tuners other than LoRA whose merge is computable from the adapter file: LoHa, LoKr, AdaLoRA, VeRA, IA³, OFT.

Formulas and key layouts: docs/peft-format.md §4 (from each tuner's layer.py in huggingface/peft's
src/peft/tuners/). Each module's merged weight is computed whole,
in PEFT's order of operations, so the merge is bit-identical to merge_and_unload. For compare the same expression is
evaluated in float64 and on absolute values (docs/math.md §12): a program of +, × and division by a constant that
rounds at most N times along any path from an input to an output satisfies |computed − exact| ≤ γ_N(u)·(the program
on |inputs|, with every subtraction made an addition). `depth` is that N, counting the rounding of scales too.
"""

import math
import re
from dataclasses import dataclass, field

import torch

from loratv.errors import LoratvError

PREFIX = "base_model.model."
# peft_type -> tensor names PEFT saves after `<module>.`
PARAMS = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "IA3": ("ia3_l",),
    "OFT": ("oft_R.weight",),
}
VERA_SHARED = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
MULTIPLICATIVE = ("IA3", "OFT")
FOREIGN = re.compile(r"\.(lora_|hada_|lokr_|vera_|ia3_|oft_|boft_)")


@dataclass
class TunerModule:
    """One non-LoRA module: the tensors that make its update and how they combine (kind-specific `options`)."""

    module: str
    target: str
    peft_type: str
    keys: dict  # role -> adapter key
    r: int | None = None
    alpha: float | None = None
    scale: float = 1.0
    options: dict = field(default_factory=dict)
    kind: str = "linear"  # orientation of the base tensor: "linear" (out, in) or "conv1d" (in, out)
    magnitude_key = None  # the LoRA-only attributes generic code asks about
    bias_key = None

    @property
    def multiplicative(self) -> bool:
        return self.peft_type in MULTIPLICATIVE

    @property
    def is_bias(self) -> bool:
        return bool(self.options.get("bias"))


def map_tuner_keys(adapter) -> None:
    """Group the file's tensors by module for the adapter's tuner; other tensors become replacements (saved biases,
    modules_to_save), as for LoRA."""
    settings, file = adapter.settings, adapter.tensors.path
    peft_type, params = settings.peft_type, PARAMS[settings.peft_type]
    groups: dict[str, dict] = {}
    shared = {}
    for key in adapter.tensors.names():
        if peft_type == "VERA" and key in VERA_SHARED:
            shared[VERA_SHARED[key]] = key
            continue
        if not key.startswith(PREFIX):
            raise LoratvError(f"{file}: tensor '{key}' lacks PEFT's '{PREFIX}' prefix; is this a PEFT adapter?")
        name = key[len(PREFIX):]
        if ".modules_to_save." in name or ".original_module." in name:
            continue
        role = next((p for p in params if name.endswith("." + p)), None)
        if peft_type == "OFT" and ".oft_embedding_R" in name:
            raise LoratvError(f"{file}: tensor '{key}' is OFT on an Embedding layer (oft_embedding_R), which loratv "
                              "does not merge: PEFT's OFT Embedding rotates the embedding dimension of every row "
                              "(W @ R), a layout loratv's OFT merge and its rounding bound do not cover.")
        if role is not None:
            groups.setdefault(name[: -len(role) - 1], {})[role] = key
        elif FOREIGN.search(name):
            raise LoratvError(f"{file}: tensor '{key}' is not a {settings.tuner_name} tensor loratv knows.")
        else:
            adapter.replacements[name] = key
    if peft_type == "VERA" and groups and len(shared) != 2:
        raise LoratvError(f"{file}: VeRA adapter without its shared projections base_model.vera_A / vera_B "
                          "(saved with save_projection = false?).")
    for module, keys in groups.items():
        adapter.modules[module] = BUILDERS[peft_type](adapter, module, {**keys, **shared})


def _shape(adapter, key) -> tuple:
    return tuple(adapter.tensors.entry(key).shape)


def _require(adapter, module, keys, *roles) -> None:
    missing = [r for r in roles if r not in keys]
    if missing:
        raise LoratvError(f"{adapter.tensors.path}: {adapter.settings.tuner_name} module '{module}' lacks "
                          f"{', '.join(missing)}.")


def _rank_and_scale(adapter, module, found_rank):
    """LoHa/LoKr: r and alpha from the config and its patterns (PEFT's matcher); scale = alpha / r."""
    r = adapter.settings.rank_for(module)
    if found_rank is not None and found_rank != r:
        raise LoratvError(f"{adapter.config_path}: module '{module}' has rank {found_rank} in the file but {r} by the "
                          "config's r/rank_pattern.")
    alpha = adapter.settings.alpha_for(module)
    return r, alpha, alpha / r


def _loha(adapter, module, keys) -> TunerModule:
    if "hada_t1" in keys or "hada_t2" in keys:
        raise LoratvError(f"{adapter.tensors.path}: LoHa module '{module}' uses effective-conv (Tucker) factors "
                          "hada_t1/hada_t2, which loratv does not merge.")
    _require(adapter, module, keys, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    w1a, w1b = _shape(adapter, keys["hada_w1_a"]), _shape(adapter, keys["hada_w1_b"])
    w2a, w2b = _shape(adapter, keys["hada_w2_a"]), _shape(adapter, keys["hada_w2_b"])
    if not (len(w1a) == len(w1b) == len(w2a) == len(w2b) == 2 and w1a[1] == w1b[0] and w2a[1] == w2b[0]
            and (w1a[0], w1b[1]) == (w2a[0], w2b[1])):
        raise LoratvError(f"{adapter.tensors.path}: LoHa module '{module}' has factors that do not chain "
                          f"(w1 {list(w1a)}@{list(w1b)}, w2 {list(w2a)}@{list(w2b)}).")
    r, alpha, scale = _rank_and_scale(adapter, module, w1a[1])
    return TunerModule(module, module + ".weight", "LOHA", keys, r, alpha, scale,
                       {"delta_shape": (w1a[0], w1b[1])})


def _lokr(adapter, module, keys) -> TunerModule:
    if "lokr_t2" in keys:
        raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}' uses effective-conv (Tucker) factor "
                          "lokr_t2, which loratv does not merge.")
    sides = {}
    found_rank = None
    for side in ("w1", "w2"):
        full, a, b = f"lokr_{side}", f"lokr_{side}_a", f"lokr_{side}_b"
        if full in keys:
            sides[side] = _shape(adapter, keys[full])
        elif a in keys and b in keys:
            sa, sb = _shape(adapter, keys[a]), _shape(adapter, keys[b])
            if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0]:
                raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}': {a} {list(sa)} and {b} "
                                  f"{list(sb)} do not chain.")
            sides[side] = (sa[0], sb[1])
            found_rank = sa[1]
        else:
            raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}' has neither {full} nor {a}/{b}.")
        if len(sides[side]) not in ((2,) if side == "w1" else (2, 3, 4)):
            raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}' has a {len(sides[side])}-D {side}.")
    r, alpha, scale = _rank_and_scale(adapter, module, found_rank)
    # kron(w1, w2) holds every product of their elements; PEFT reshapes it to the base weight
    elements = math.prod(sides["w1"]) * math.prod(sides["w2"])
    return TunerModule(module, module + ".weight", "LOKR", keys, r, alpha, scale, {"delta_shape": (elements,)})


def _adalora(adapter, module, keys) -> TunerModule:
    _require(adapter, module, keys, "lora_A", "lora_B", "lora_E")
    a, b, e = (_shape(adapter, keys[k]) for k in ("lora_A", "lora_B", "lora_E"))
    r = a[0] if len(a) == 2 else None
    if len(a) != 2 or len(b) != 2 or b[1] != r or e != (r, 1):
        raise LoratvError(f"{adapter.tensors.path}: AdaLoRA module '{module}' has inconsistent shapes (lora_A "
                          f"{list(a)}, lora_B {list(b)}, lora_E {list(e)}).")
    init_r = adapter.settings.r
    mask = next((v for k, v in adapter.settings.rank_pattern.items()
                 if k.removeprefix(PREFIX).removesuffix(".lora_E") == module), None)
    if mask is not None and sum(bool(x) for x in mask) != r:
        raise LoratvError(f"{adapter.config_path}: rank_pattern keeps {sum(bool(x) for x in mask)} triplets of "
                          f"'{module}' but {adapter.tensors.path.name} stores {r}.")
    if r > init_r:
        raise LoratvError(f"{adapter.tensors.path}: AdaLoRA module '{module}' stores rank {r} above init_r = {init_r}.")
    alpha = adapter.settings.lora_alpha
    scaling = alpha if alpha > 0 else float(init_r)  # PEFT's AdaLoraLayer.update_layer
    return TunerModule(module, module + ".weight", "ADALORA", keys, r, alpha, scaling / (init_r + 1e-5),
                       {"scaling": scaling, "ranknum": float(init_r), "delta_shape": (b[0], a[1])})


def _vera(adapter, module, keys) -> TunerModule:
    _require(adapter, module, keys, "vera_lambda_b", "vera_lambda_d")
    lb, ld = _shape(adapter, keys["vera_lambda_b"]), _shape(adapter, keys["vera_lambda_d"])
    va, vb = _shape(adapter, keys["vera_A"]), _shape(adapter, keys["vera_B"])
    if len(lb) != 1 or len(ld) != 1 or len(va) != 2 or len(vb) != 2 or not (ld[0] == va[0] == vb[1]):
        raise LoratvError(f"{adapter.tensors.path}: VeRA module '{module}' has inconsistent shapes (lambda_b "
                          f"{list(lb)}, lambda_d {list(ld)}, vera_A {list(va)}, vera_B {list(vb)}).")
    return TunerModule(module, module + ".weight", "VERA", keys, ld[0], None, 1.0, {"out": lb[0]})


def _matches(spec, module: str) -> bool:
    """PEFT's target matching for feedforward_modules: a regex string is full-matched, a list matched by suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == k or module.endswith("." + k) for k in spec)


def _ia3(adapter, module, keys) -> TunerModule:
    shape = _shape(adapter, keys["ia3_l"])
    feedforward = _matches(adapter.settings.raw.get("feedforward_modules"), module)
    # Linear/Conv1D: (1, in) feedforward, (out, 1) otherwise; ConvNd: (1, in or out, 1, …); check_fits checks sizes
    linear_ok = len(shape) == 2 and (shape[0] == 1 if feedforward else shape[1] == 1)
    conv_ok = len(shape) > 2 and shape[0] == 1 and all(k == 1 for k in shape[2:])
    if not (linear_ok or conv_ok):
        raise LoratvError(f"{adapter.tensors.path}: IA³ vector of '{module}' has shape {list(shape)}; a "
                          f"{'feedforward' if feedforward else 'non-feedforward'} module stores "
                          f"{'(1, in)' if feedforward else '(out, 1)'} (a convolution (1, channels, 1, …)).")
    return TunerModule(module, module + ".weight", "IA3", keys, None, None, 1.0, {"feedforward": feedforward})


def _oft(adapter, module, keys) -> TunerModule:
    shape = _shape(adapter, keys["oft_R.weight"])
    block = (1 + math.isqrt(1 + 8 * shape[1])) // 2 if len(shape) == 2 else 0
    if len(shape) != 2 or block * (block - 1) // 2 != shape[1] or block < 2:
        raise LoratvError(f"{adapter.tensors.path}: OFT module '{module}' stores oft_R {list(shape)}, which is not "
                          "(blocks, b(b−1)/2).")
    raw = adapter.settings.raw
    options = {"block": block, "blocks": shape[0], "block_share": bool(raw.get("block_share")),
               "neumann": raw.get("use_cayley_neumann", True) is not False,
               "terms": int(raw.get("num_cayley_neumann_terms", 5))}
    return TunerModule(module, module + ".weight", "OFT", keys, shape[0], None, 1.0, options)


BUILDERS = {"LOHA": _loha, "LOKR": _lokr, "ADALORA": _adalora, "VERA": _vera, "IA3": _ia3, "OFT": _oft}


def check_fits(adapter, module: TunerModule, shape: tuple) -> None:
    """The module's update must have the base tensor's shape (PEFT reshapes LyCORIS deltas: the element count)."""
    file = adapter.tensors.path
    fail = None
    conv = len(shape) > 2
    if conv and module.peft_type not in ("LOHA", "LOKR", "IA3", "OFT") or len(shape) < 2:
        fail = f"is {len(shape)}-D; loratv merges {adapter.settings.tuner_name} into Linear/Conv1D weights only"
    elif module.peft_type in ("LOHA", "LOKR"):
        if math.prod(module.options["delta_shape"]) != math.prod(shape):
            fail = f"has {math.prod(shape)} elements but the update has {math.prod(module.options['delta_shape'])}"
    elif module.peft_type == "ADALORA":
        out_in = module.options["delta_shape"]
        if tuple(shape) != (out_in if module.kind == "linear" else out_in[::-1]):
            fail = f"does not fit lora_B @ lora_A {list(out_in)}"
    elif module.peft_type == "VERA":
        out, inp = shape if module.kind == "linear" else shape[::-1]
        va, vb = _shape(adapter, module.keys["vera_A"]), _shape(adapter, module.keys["vera_B"])
        if module.options["out"] != out or va[1] < inp or vb[0] < out:
            fail = f"({out} out, {inp} in) does not fit lambda_b {module.options['out']} or vera_A/B {list(va)}/{list(vb)}"
    elif module.peft_type == "IA3":
        if conv:  # PEFT's Conv IA³: (1, out, 1, …), or (1, in, 1, …) for feedforward (groups = 1 only)
            ones = [1] * (len(shape) - 2)
            want = (1, shape[1], *ones) if module.options["feedforward"] else (1, shape[0], *ones)
        else:
            out, inp = shape if module.kind == "linear" else shape[::-1]
            want = (1, inp) if module.options["feedforward"] else (out, 1)
        if _shape(adapter, module.keys["ia3_l"]) != want:
            fail = f"needs an IA³ vector of shape {list(want)}"
    elif module.peft_type == "OFT":
        if module.kind == "conv1d":
            fail = "is a Conv1D weight (fan_in_fan_out), which OFT does not rotate in loratv"
        elif conv and (len(shape) != 4 or shape[2] != shape[3]):
            fail = "is not a square Conv2d kernel (PEFT's OFT assumes kernel_size[0]²)"
        else:
            inp, o = math.prod(shape[1:]), module.options
            wanted_blocks = 1 if o["block_share"] else inp // o["block"]
            if inp % o["block"] or o["blocks"] != wanted_blocks:
                fail = f"has {inp} inputs, which {o['blocks']} OFT blocks of size {o['block']} do not cover"
    if fail:
        raise LoratvError(f"{file}: {adapter.settings.tuner_name} module '{module.module}': base tensor "
                          f"'{module.target}' {list(shape)} {fail}.")


def ia3_bias_module(module: TunerModule) -> TunerModule:
    """IA³ scales a non-feedforward module's bias by the same vector (PEFT's IA3Layer.merge)."""
    return TunerModule(module.module, module.module + ".bias", "IA3", module.keys, None, None, 1.0,
                       {**module.options, "bias": True}, module.kind)


def depth(module: TunerModule, shape: tuple) -> int:
    """N of γ_N: roundings along any path of the evaluation, scales' own rounding to float32 included."""
    o, t = module.options, module.peft_type
    if t == "LOHA":
        return 2 * module.r + 3  # two length-r dot products, their product, the scale and its rounding
    if t == "LOKR":  # each Kronecker factor stored whole (exact) or as a length-r product; kron, scale, its rounding
        products = sum(f"lokr_{side}" not in module.keys for side in ("w1", "w2"))
        return products * module.r + 3
    if t == "ADALORA":
        return module.r + 5  # A⊙E, the dot, ×scaling (rounded), ÷(ranknum + 1e-5) (rounded)
    if t == "VERA":
        return module.r + 2
    if t == "IA3":
        return 1
    b, n = o["block"], o["terms"]
    # R = I + 2Q + … + Q^(n−1): Q^k has depth (k−1)·b, n−1 additions; then a length-b dot product with W
    return max(n - 2, 0) * b + max(n - 1, 0) + b + 1


# --- evaluation: one function per kind, used with PEFT's dtypes (merge), in float64 (compare) and on |inputs| ---

def _tensors(adapter, module, dtype, device, absolute=False) -> dict:
    out = {}
    for role, key in module.keys.items():
        t = adapter.factor(key).to(device=device, dtype=dtype)
        out[role] = t.abs() if absolute else t
    return out


def additive_delta(adapter, module: TunerModule, shape, dtype, device, absolute=False, exact_scale=False):
    """ΔW in the base tensor's stored orientation and shape. With `exact_scale` the scale is the float64 value
    (compare's reference); otherwise as PEFT applies it (a float32 tensor for LoHa, Python floats elsewhere)."""
    t = _tensors(adapter, module, dtype, device, absolute)
    kind = module.peft_type
    if kind == "LOHA":
        scale = torch.tensor(module.scale, dtype=torch.float64 if exact_scale else torch.float32)
        scale = scale.abs() if absolute else scale
        delta = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])) * scale
        return delta.reshape(shape)
    if kind == "LOKR":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:  # PEFT's make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        delta = torch.kron(w1, w2.contiguous()) * (abs(module.scale) if absolute else module.scale)
        return delta.reshape(shape)
    if kind == "ADALORA":
        o = module.options
        delta = t["lora_B"] @ (t["lora_A"] * t["lora_E"])
        if module.kind != "linear":
            delta = delta.T
        scaling = abs(o["scaling"]) if absolute else o["scaling"]
        if exact_scale:
            return delta * scaling / (o["ranknum"] + 1e-5)
        # PEFT divides by ranknum + 1e-5 held in a one-element float32 tensor
        return delta * scaling / (torch.tensor([o["ranknum"]], device=device) + 1e-5)
    if kind == "VERA":
        out, inp = shape if module.kind == "linear" else shape[::-1]
        sliced_a, sliced_b = t["vera_A"][:, :inp], t["vera_B"][:out, :]
        delta = (t["vera_lambda_b"].unsqueeze(-1) * sliced_b) @ (t["vera_lambda_d"].unsqueeze(-1) * sliced_a)
        return delta if module.kind == "linear" else delta.T
    raise ValueError(kind)


def ia3_vector(adapter, module: TunerModule, dtype, device, absolute=False) -> torch.Tensor:
    """l shaped to broadcast against the stored weight (or bias) as PEFT's IA3Layer.merge does."""
    l_vec = adapter.factor(module.keys["ia3_l"]).to(device=device, dtype=dtype)
    l_vec = l_vec.abs() if absolute else l_vec
    if module.is_bias:
        return l_vec.reshape(-1)
    if module.kind == "conv":  # _get_ia3_scaling_for_weight: (1, out, 1, …) → (out, 1, 1, …); feedforward as stored
        return l_vec if module.options["feedforward"] else l_vec.transpose(0, 1)
    return l_vec.T if module.kind != "linear" else l_vec


def oft_rotation(adapter, module: TunerModule, dtype, device, absolute=False) -> torch.Tensor:
    """The per-block rotations (blocks, b, b), as PEFT's OFTRotationModule._cayley_batch builds them."""
    o = module.options
    vec = adapter.factor(module.keys["oft_R.weight"]).to(device=device, dtype=dtype)
    vec = vec.abs() if absolute else vec
    b, count = o["block"], vec.shape[0]
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    q = torch.zeros(count, b, b, device=device, dtype=dtype)
    q[:, rows, cols] = vec
    q = q + q.transpose(-2, -1) if absolute else q - q.transpose(-2, -1)  # disjoint triangles: |Q| exactly
    if not o["neumann"]:
        eye = torch.eye(b, device=device, dtype=dtype).unsqueeze(0).expand(count, b, b)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = torch.eye(b, device=device, dtype=dtype).repeat(count, 1, 1)
    n = o["terms"]
    if n > 1:
        r.add_(q, alpha=2.0)
        if n > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, n - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            power = torch.bmm(power, q)
            r.add_(power)
    return r


def merged_value(adapter, module: TunerModule, w: torch.Tensor) -> torch.Tensor:
    """The merged tensor from `w` (the base, already in the compute dtype), as PEFT's merge computes it."""
    if module.peft_type == "IA3":
        return torch.mul(w, ia3_vector(adapter, module, w.dtype, w.device))
    if module.peft_type == "OFT":  # Conv2d: the weight viewed as (out, in·k·k)
        rotation = oft_rotation(adapter, module, w.dtype, w.device)
        flat = w.reshape(w.shape[0], -1)
        count = flat.shape[1] // module.options["block"]
        blocks = [rotation[0 if module.options["block_share"] else i] for i in range(count)]
        return torch.mm(torch.block_diag(*blocks), flat.t()).t().reshape(w.shape)
    return w + additive_delta(adapter, module, tuple(w.shape), w.dtype, w.device)


def apply_rows(adapter, module: TunerModule, x: torch.Tensor, start: int, stop: int, absolute=False,
               cache: dict | None = None) -> torch.Tensor:
    """A multiplicative module applied to rows [start, stop) of `x` in float64 (rows are independent: IA³ scales
    and OFT rotates along the input axis), on absolute values when `absolute`."""
    cache = {} if cache is None else cache
    key = ("abs" if absolute else "value", module.peft_type)
    if module.peft_type == "IA3":
        if key not in cache:
            cache[key] = ia3_vector(adapter, module, torch.float64, x.device, absolute)
        l_vec = cache[key]
        if module.is_bias or (module.kind in ("linear", "conv") and not module.options["feedforward"]) or (
                module.kind == "conv1d" and module.options["feedforward"]):
            l_vec = l_vec[start:stop]  # one factor per stored row
        return x * l_vec
    if key not in cache:
        cache[key] = oft_rotation(adapter, module, torch.float64, x.device, absolute)
    rotation, b = cache[key], module.options["block"]
    blocks = x.reshape(x.shape[0], -1, b)
    if module.options["block_share"]:
        return torch.einsum("okj,ij->oki", blocks, rotation[0]).reshape(x.shape)
    return torch.einsum("okj,kij->oki", blocks, rotation).reshape(x.shape)
