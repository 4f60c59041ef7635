"""Regenerate docs/coverage.md's precision section: expected vs found sites per kind.

The expectation comes from each family's own code and flags, never from se-surgery: the
block classes a family defines and the flags it sets on them (timm's ``has_skip`` on
EfficientNet-builder blocks, torchvision's ``use_res_connect``, ReXNet's ``use_shortcut``,
VoVNet's ``residual``, ...), read from the built model. Sites are matched by owner path
(a block that performs two joins, as a Swin block, is expected twice), so a site found in
the wrong block counts against precision and recall both.

    nice python benchmarks/coverage.py            # rewrites its section of docs/coverage.md
    python benchmarks/coverage.py --only resnet   # a subset, printed, nothing written
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from se_surgery._sites import discover  # noqa: E402 - the checkout's, not an installed copy

KINDS = ("residual", "concat", "branch_sum", "block")


def _paths(model: nn.Module, classes, cond=lambda m: True) -> list[str]:
    names = {classes} if isinstance(classes, str) else set(classes)
    return [p for p, m in model.named_modules() if type(m).__name__ in names and cond(m)]


def _skip_or_block(model, classes, flag, block_classes=None):
    """Blocks with the family's skip flag set are residual; the others, where they are
    depthwise blocks (``block_classes``), are block sites."""
    block_classes = classes if block_classes is None else block_classes
    return {"residual": _paths(model, classes, lambda m: bool(getattr(m, flag))),
            "block": _paths(model, block_classes, lambda m: not getattr(m, flag))}


# ---------------------------------------------------------------- expectations per family


def resnet(m):
    return {"residual": _paths(m, ("BasicBlock", "Bottleneck", "PreActBottleneck", "PreActBasic", "NormFreeBlock",
                                   "ResBottleneckBlock", "CNBlock", "ConvNeXtBlock"))}


def efficientnet_builder(m):  # timm's EfficientNet / MobileNetV3 / MnasNet / FBNet / LCNet / MixNet / TinyNet
    return _skip_or_block(m, ("ConvBnAct", "DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual",
                              "CondConvResidual"), "has_skip",
                          ("DepthwiseSeparableConv", "InvertedResidual", "CondConvResidual"))


def tv_mobile(m):  # torchvision MobileNetV2 / V3, EfficientNet (MBConv; FusedMBConv has no depthwise conv)
    out = _skip_or_block(m, ("InvertedResidual", "MBConv", "FusedMBConv"), "use_res_connect",
                         ("InvertedResidual", "MBConv"))
    return out


def tv_mnasnet(m):
    return _skip_or_block(m, "_InvertedResidual", "apply_residual")


def rexnet(m):
    return _skip_or_block(m, "LinearBottleneck", "use_shortcut")


def dpn(m):
    blocks = _paths(m, "DualPathBlock")
    return {"residual": blocks, "concat": blocks}  # x_s[:, :c] + out, then cat([resid, dense...])


def vovnet(m):
    return {"concat": [f"{p}.conv_mid" for p in _paths(m, "OsaBlock")],
            "residual": _paths(m, "OsaBlock", lambda b: b.residual)}


def cspnet(m):
    return {"concat": _paths(m, "CrossStage"), "residual": _paths(m, ("BottleneckBlock", "DarkBlock"))}


def ghostnet(m):
    return {"residual": _paths(m, "GhostBottleneck"), "concat": _paths(m, "GhostModule")}


def res2net(m):
    blocks = _paths(m, "Bottle2neck")
    return {"residual": blocks, "concat": blocks}  # one cat of the scale groups per block


def repvgg(m):
    return {"branch_sum": _paths(m, "RepVggBlock")}  # conv_kxk + conv_1x1 (+ BN identity)


def xception(m):
    return {"residual": _paths(m, "XceptionModule", lambda b: not b.no_skip)}


def densenet(m):
    out = []
    for p, b in m.named_modules():
        if type(b).__name__ == "_DenseBlock":
            out += [f"{p}.{n}" for n in list(b._modules)[1:]]  # the first layer concatenates one tensor
            out.append(p)  # the block's own cat of every layer's output
    return {"concat": out}


def inception(m):
    return {"concat": _paths(m, ("Inception", "InceptionA", "InceptionB", "InceptionC", "InceptionD",
                                 "InceptionE"))}


def fire(m):
    return {"concat": _paths(m, "Fire")}


def shufflenet(m):
    return {"concat": _paths(m, "InvertedResidual")}  # cat(x1, branch2(x2)) / cat(branch1, branch2)


def swin(m):
    return {"residual": [p for p in _paths(m, "SwinTransformerBlock") for _ in (0, 1)]}  # attention and MLP


def nothing(m):
    return {}


# (label, builder, expectation)
MODELS = [
    ("tv:resnet18", "tv:resnet18", resnet), ("tv:resnet50", "tv:resnet50", resnet),
    ("tv:resnext50_32x4d", "tv:resnext50_32x4d", resnet), ("tv:wide_resnet50_2", "tv:wide_resnet50_2", resnet),
    ("tv:regnet_y_400mf", "tv:regnet_y_400mf", resnet), ("tv:convnext_tiny", "tv:convnext_tiny", resnet),
    ("tv:mobilenet_v2", "tv:mobilenet_v2", tv_mobile), ("tv:mobilenet_v3_large", "tv:mobilenet_v3_large", tv_mobile),
    ("tv:efficientnet_b0", "tv:efficientnet_b0", tv_mobile), ("tv:efficientnet_v2_s", "tv:efficientnet_v2_s", tv_mobile),
    ("tv:mnasnet1_0", "tv:mnasnet1_0", tv_mnasnet), ("tv:shufflenet_v2_x1_0", "tv:shufflenet_v2_x1_0", shufflenet),
    ("tv:squeezenet1_1", "tv:squeezenet1_1", fire), ("tv:densenet121", "tv:densenet121", densenet),
    ("tv:googlenet", "tv:googlenet", inception), ("tv:inception_v3", "tv:inception_v3", inception),
    ("tv:swin_t", "tv:swin_t", swin), ("tv:vgg11", "tv:vgg11", nothing), ("tv:vit_b_16", "tv:vit_b_16", nothing),
    ("timm:resnet26d", "resnet26d", resnet), ("timm:resnet50d", "resnet50d", resnet),
    ("timm:seresnext26d_32x4d", "seresnext26d_32x4d", resnet), ("timm:resnetv2_50", "resnetv2_50", resnet),
    ("timm:nf_resnet26", "nf_resnet26", resnet), ("timm:regnety_008", "regnety_008", lambda m: {
        "residual": _paths(m, "Bottleneck")}), ("timm:convnext_atto", "convnext_atto", resnet),
    ("timm:efficientnet_b0", "efficientnet_b0", efficientnet_builder),
    ("timm:efficientnet_lite0", "efficientnet_lite0", efficientnet_builder),
    ("timm:mobilenetv2_100", "mobilenetv2_100", efficientnet_builder),
    ("timm:mobilenetv3_large_100", "mobilenetv3_large_100", efficientnet_builder),
    ("timm:mobilenetv3_small_100", "mobilenetv3_small_100", efficientnet_builder),
    ("timm:mnasnet_100", "mnasnet_100", efficientnet_builder), ("timm:fbnetc_100", "fbnetc_100", efficientnet_builder),
    ("timm:spnasnet_100", "spnasnet_100", efficientnet_builder), ("timm:lcnet_050", "lcnet_050", efficientnet_builder),
    ("timm:tinynet_a", "tinynet_a", efficientnet_builder), ("timm:mixnet_s", "mixnet_s", efficientnet_builder),
    ("timm:efficientnetv2_rw_t", "efficientnetv2_rw_t", efficientnet_builder),
    ("timm:rexnet_100", "rexnet_100", rexnet), ("timm:rexnetr_100", "rexnetr_100", rexnet),
    ("timm:dpn68b", "dpn68b", dpn), ("timm:ese_vovnet19b_dw", "ese_vovnet19b_dw", vovnet),
    ("timm:ese_vovnet39b", "ese_vovnet39b", vovnet), ("timm:cspresnet50", "cspresnet50", cspnet),
    ("timm:cspdarknet53", "cspdarknet53", cspnet), ("timm:ghostnet_100", "ghostnet_100", ghostnet),
    ("timm:res2net50_26w_4s", "res2net50_26w_4s", res2net), ("timm:repvgg_a0", "repvgg_a0", repvgg),
    ("timm:xception41", "xception41", xception), ("timm:twins_pcpvt_small", "twins_pcpvt_small", nothing),
    ("timm:coat_lite_tiny", "coat_lite_tiny", nothing),
]


def build(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("tv:"):
            kw = {"init_weights": False} if name in ("tv:googlenet", "tv:inception_v3") else {}
            return torchvision.models.get_model(name[3:], weights=None, **kw).eval()
        return timm.create_model(name, pretrained=False).eval()


def measure(label, name, expect) -> dict:
    torch.manual_seed(0)
    model = build(name)
    wanted = {k: Counter(v) for k, v in expect(model).items()}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = discover(model)
    seconds = time.perf_counter() - t
    row = {"model": label, "seconds": seconds, "stages": d.stage_source}
    for kind in KINDS:
        found = Counter(s.owner for s in d.sites if s.kind == kind)
        exp = wanted.get(kind, Counter())
        row[kind] = (sum(exp.values()), sum(found.values()), sum((found & exp).values()))
    return row


def _pct(num: int, den: int) -> str:
    return "-" if den == 0 else f"{100 * num / den:.1f} %"


def table(rows: list[dict]) -> str:
    head = "| model | " + " | ".join(f"{k} exp/found" for k in KINDS) + " | stages | discovery s |"
    lines = [head, "|" + "---|" * (len(KINDS) + 3)]
    for r in rows:
        cells = []
        for k in KINDS:
            e, f, tp = r[k]
            mark = "" if e == f == tp else " **x**"
            cells.append(f"{e}/{f}{mark}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {r['stages']} | {r['seconds']:.2f} |")
    lines += ["", "| kind | expected | found | matched | precision | recall |", "|---|---|---|---|---|---|"]
    for k in KINDS:
        e = sum(r[k][0] for r in rows)
        f = sum(r[k][1] for r in rows)
        tp = sum(r[k][2] for r in rows)
        lines.append(f"| {k} | {e} | {f} | {tp} | {_pct(tp, f)} | {_pct(tp, e)} |")
    return "\n".join(lines)


BEGIN, END = "<!-- precision: begin (benchmarks/coverage.py) -->", "<!-- precision: end -->"
PREAMBLE = """## Precision and recall: expected vs found sites per kind

Generated by `benchmarks/coverage.py` (run `nice python benchmarks/coverage.py`; it rewrites
only this section, between its markers; do not edit by hand). torch {torch}, torchvision
{tv}, timm {timm}.

For {n} model families (torchvision and timm, built without weights), the sites se-surgery
finds are compared with what each family's own code says it has: the block classes it
defines and the flags it sets on them (timm's `has_skip` on EfficientNet-builder blocks,
torchvision's `use_res_connect`, ReXNet's `use_shortcut`, VoVNet's `residual`, DPN's dual
path, DenseNet's block configuration, ...). The expectations never come from se-surgery.
Sites are matched by the module that performs the join (its owner), so a join found in
the wrong block counts against both precision (matched / found) and recall (matched /
expected). A cell is `expected/found`; **x** marks a model where they differ. `stages`
says where the stage numbers came from (the model's own declaration, else output stride).

"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated substrings of the models to run; prints, writes nothing")
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    args = ap.parse_args(argv)
    chosen = [m for m in MODELS if not args.only or any(o in m[0] for o in args.only.split(","))]
    rows = []
    for label, name, expect in chosen:
        row = measure(label, name, expect)
        rows.append(row)
        print(label, {k: row[k] for k in KINDS}, f"{row['seconds']:.2f}s", flush=True)
    text = PREAMBLE.format(n=len(rows), torch=torch.__version__, tv=torchvision.__version__,
                           timm=timm.__version__) + table(rows) + "\n"
    if args.only:
        print(text)
        return 0
    out = Path(args.out)
    old = out.read_text(encoding="utf-8") if out.is_file() else ""
    section = f"{BEGIN}\n{text}{END}\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + section + old[old.index(END) + len(END) + 1:]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + section
    out.write_text(new, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
