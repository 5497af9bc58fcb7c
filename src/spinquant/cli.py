"""`spinquant` command line: a thin layer that turns flags into a RunConfig and calls the API."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace

from . import api, distributed
from .config import (
    DEFAULT_MODEL,
    STE_KINDS,
    TABLE_DTYPES,
    TARGETS,
    TRAIN_PRESETS,
    QuantConfig,
    QuantSpec,
    RotationMode,
    RunConfig,
)
from .errors import SpinQuantError
from .evaluation.data import check_calibration_differs


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that shows each flag's default (taken from the config dataclasses), except empty ones."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == argparse.SUPPRESS)
        if shown and "default" not in text and action.option_strings:
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but bad flags give one line and exit 2 like every other input error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise SpinQuantError(f"{message}; see '{self.prog} --help'")


DEFAULTS = RunConfig()  # every flag's default comes from the config dataclasses, not from here


def _bits(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer (2-8 or 16), got {text!r}") from None


_ROLE_BITS_ITEM = re.compile(r"\s*([a-z]+)(?:@(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*))?\s*=\s*(\d+)\s*(?:,|$)")


def _role_bits(text: str) -> dict[str, int]:
    """'down=4,v@0-2,5=8' → {"down": 4, "v.0": 8, "v.1": 8, "v.2": 8, "v.5": 8}: a role in every layer, or
    in the layers after @ (indices and ranges); roles and bits are checked with the rest of the config."""
    out, at = {}, 0
    while at < len(text):
        m = _ROLE_BITS_ITEM.match(text, at)
        if m is None or m.end() == at:
            raise argparse.ArgumentTypeError(f"{text[at:]!r} is not ROLE=BITS or ROLE@LAYERS=BITS "
                                             "(e.g. down=4 or v@0-2,5=8)")
        role, layers, bits = m.groups()
        if layers is None:
            out[role] = int(bits)
        for part in (layers.split(",") if layers else ()):
            first, _, last = part.partition("-")
            for i in range(int(first), int(last or first) + 1):
                out[f"{role}.{i}"] = int(bits)
        at = m.end()
    return out


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    if value > 2**31 - 1:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most {2**31 - 1})")
    return value


def _path(text: str) -> str:
    """A path or name the user typed: an empty one (e.g. from an unset shell variable) is refused rather
    than read as 'not given', which would skip the output or fall back to a default model."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, type=_path, help="HF folder, hub id, .gguf file or built-in name")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of random rotations, sampling and batches")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--device", default=DEFAULTS.device, help="compute device: auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory and move one decoder layer at a time to --device "
                        "(merge, weights, evaluation; for models bigger than the device)")
    add_threads_arg(p)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_threads, metavar="N|auto",
                   help="CPU threads for tensor ops and kernels (default: one per core, or OMP_NUM_THREADS); auto: "
                        "the cores idle at start, faster for GPTQ and training when other work shares the machine")


def _threads(text: str) -> int:
    """'auto' → 0 (RunConfig: the idle cores); else a positive count."""
    return 0 if text.strip().lower() == "auto" else _positive(text)


def add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help="load a saved spinquant folder without checking its sha256 manifest (says so on stderr); "
                        "its tensor layout is still checked")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=DEFAULTS.eval.data, type=_path, help="wikitext2 (test split), c4, or a text/JSONL file")
    g.add_argument("--seq-len", type=_positive, default=DEFAULTS.eval.seq_len, help="perplexity window length (tokens)")
    g.add_argument("--max-windows", type=_positive, default=DEFAULTS.eval.max_windows, help="evaluate the first N windows")
    g.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    g.add_argument("--tasks", help="zero-shot tasks, comma list: piqa, arc_easy, hellaswag run offline; other "
                                   "lm-eval names (arc_challenge, boolq, social_iqa, openbookqa, winogrande) "
                                   "need spinquant[lm-eval]; 'spinquant' = the paper's eight")
    g.add_argument("--task-limit", type=_positive, help="score only the first N items of each task")


def add_export_args(p: argparse.ArgumentParser) -> None:
    from .export import DTYPE_CHOICES, FORMATS, WEIGHT_TYPES

    g = p.add_argument_group("export (from the quantized model in memory)")
    g.add_argument("--export", choices=FORMATS, help="also write the model in this format")
    g.add_argument("--export-output", type=_path, help="file (gguf, rotations) or folder (compressed-tensors) to write")
    g.add_argument("--gguf-type", choices=WEIGHT_TYPES, default="Q8_0", help="GGUF weight type")
    g.add_argument("--gguf-tables", choices=[t for t in WEIGHT_TYPES if t != "auto"],
                   help="GGUF embedding / output type (default Q8_0, F16 for an F16 export)")
    g.add_argument("--export-dtype", choices=DTYPE_CHOICES, default="bfloat16",
                   help="compressed-tensors: dtype of scales and float tensors")


def export_request(a: argparse.Namespace, fmt: str | None, output: str | None):
    """The ExportRequest the flags ask for, or None."""
    if not fmt:
        if output:
            raise SpinQuantError("--export-output needs --export FORMAT (compressed-tensors, gguf or rotations)")
        return None
    from .export import ExportRequest

    if not output:
        raise SpinQuantError(f"--export {fmt} needs --export-output PATH")
    return ExportRequest(format=fmt, output=output, gguf_type=a.gguf_type, gguf_tables=a.gguf_tables,
                         dtype=a.export_dtype, overwrite=a.overwrite)


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    q = DEFAULTS.quant
    g.add_argument("--w-bits", type=_bits, default=q.weight.bits, help="weight bits (2-8, 16 = float)")
    g.add_argument("--a-bits", type=_bits, default=q.act.bits, help="activation bits (2-8, 16 = float)")
    g.add_argument("--kv-bits", type=_bits, default=q.key.bits, help="K and V cache bits (2-8, 16 = float)")
    g.add_argument("--k-bits", type=_bits, help="key cache bits (overrides --kv-bits)")
    g.add_argument("--v-bits", type=_bits, help="value cache bits (overrides --kv-bits)")
    g.add_argument("--w-bits-role", type=_role_bits, default={}, metavar="ROLE[@LAYERS]=BITS[,...]",
                   help="other weight bits for some linears, in every layer or in the layers named after @, e.g. "
                        "down=4,v@0-2,27=8 (roles: q, k, v, o, gate, up, down; layers from 0); saved as GGUF "
                        "(--gguf-type auto)")
    g.add_argument("--w-group", type=int, help="weight group size (default: per output channel)")
    g.add_argument("--a-group", type=int, help="activation group size (default: per token)")
    g.add_argument("--w-asym", action="store_true", help="asymmetric weight grid")
    g.add_argument("--w-full-range", action="store_true",
                   help="symmetric weight grid on all 2^bits levels: each row's or group's largest |w| maps to "
                        "-2^(bits-1) (llama.cpp's Q4_0/Q5_0 grid; finer steps than the default amax/(2^(bits-1)-1))")
    g.add_argument("--a-sym", action="store_true", help="symmetric activation grid")
    g.add_argument("--a-clip", type=float, default=q.act.clip_ratio, help="activation clip ratio")
    g.add_argument("--kv-clip", type=float, default=q.key.clip_ratio, help="K/V clip ratio")
    g.add_argument("--no-w-clip-search", action="store_true", help="plain min-max weight range")
    g.add_argument("--weight-quant", choices=("rtn", "gptq"), default=q.weight_method,
                   help="weights by round-to-nearest (with clip search) or GPTQ on calibration text")
    g.add_argument("--gptq-samples", type=_positive, default=DEFAULTS.gptq.samples, help="GPTQ calibration windows")
    g.add_argument("--gptq-seq-len", type=_positive, default=DEFAULTS.gptq.seq_len,
                   help="GPTQ calibration window length (tokens)")
    g.add_argument("--gptq-act-order", action="store_true", help="GPTQ columns in order of decreasing Hessian diagonal")
    g.add_argument("--gptq-damp", type=float, default=DEFAULTS.gptq.damp,
                   help="GPTQ damping: this fraction of the Hessian's mean diagonal is added to its diagonal")
    g.add_argument("--gptq-act-aware", type=float, nargs="?", const=1.0, default=DEFAULTS.gptq.act_aware,
                   metavar="WEIGHT",
                   help="fit each weight to the activation-quantized inputs it will multiply (GPTAQ): minimise "
                        "WEIGHT*|W x - Q(W) Q(x)|^2 + (1-WEIGHT)*|W x - Q(W) x|^2 (alone: WEIGHT 1); for A < 16")
    g.add_argument("--gptq-float-targets", action="store_true",
                   help="with --gptq-act-aware: x is the float model's input to the same linear (a second "
                        "stream of calibration inputs), so the weights also undo the error of the quantized "
                        "layers before them; works at A16 too")
    g.add_argument("--gptq-weighted-clip", action="store_true",
                   help="weigh the clip search's error by each input channel's mean square (an importance matrix)")
    g.add_argument("--tune-scales", type=int, default=DEFAULTS.tune.steps, metavar="STEPS",
                   help="after RTN/GPTQ, train every weight scale (codes kept) for STEPS steps so the quantized "
                        "model matches the float one's next-token distribution, on --calib-data (0: off)")
    g.add_argument("--tune-lr", type=float, default=DEFAULTS.tune.lr, help="scale tuning learning rate (Adam)")

    r = p.add_argument_group("rotation")
    r.add_argument("--rotation", choices=[m.value for m in RotationMode], default=DEFAULTS.rotation.mode.value,
                   help="R1/R2: none, random Hadamard (QuaRot), random orthogonal, or learned (SpinQuant)")
    r.add_argument("--no-r1", action="store_true",
                   help="no R1 on the residual stream, R2 alone: norms stay unfused and a tied embedding stays "
                        "one table (GGUF targets)")
    r.add_argument("--no-r3", action="store_true", help="no online Hadamard on Q/K (R3)")
    r.add_argument("--no-r4", action="store_true", help="no online Hadamard before down_proj (R4)")
    r.add_argument("--rotation-file", type=_path, help="with --rotation learned: load these rotations instead of training")
    r.add_argument("--save-rotation", type=_path, help="write the R1/R2 used to this file (safetensors)")
    r.add_argument("--calib-data", default=DEFAULTS.train.calib_data, type=_path,
                   help="calibration text for training and GPTQ: wikitext2-valid, c4, or a text/JSONL file")

    t = p.add_argument_group("rotation training (--rotation learned)")
    presets = ", ".join(f"{k}: {v['steps']} steps x {v['batch']} x {v['seq_len']} tokens, lr {v['lr']}"
                        for k, v in sorted(TRAIN_PRESETS.items()))
    t.add_argument("--train-preset", choices=sorted(TRAIN_PRESETS), default="cpu", help=presets)
    t.add_argument("--train-steps", type=_positive, help="Cayley SGD steps (default: the preset's)")
    t.add_argument("--train-seq-len", type=_positive, help="training window length (default: the preset's)")
    t.add_argument("--train-batch", type=_positive, help="windows per step (default: the preset's)")
    t.add_argument("--lr", type=float, help="Cayley SGD learning rate (default: the preset's)")
    t.add_argument("--train-loss", choices=("kl", "ce"), default=DEFAULTS.train.loss,
                   help="kl: match the float model's next-token distribution; ce: the labels (paper)")
    t.add_argument("--train-ste", choices=STE_KINDS, default="identity",
                   help="gradient of the activation/KV quantizers where they clip: pass it through (identity) "
                        "or drop it (clipped)")
    t.add_argument("--train-weights", choices=("auto", "float", "grid"), default="auto",
                   help="weights inside the training loop: float (the paper's mode for GPTQ), grid (fake-"
                        "quantized on the final grid; the only quantizer of a weights-only run), auto: float "
                        "for GPTQ, grid for RTN")
    t.add_argument("--train-checkpoint", type=_path, help="keep the training state in this file (also on Ctrl-C or NaN)")
    t.add_argument("--train-checkpoint-every", type=_positive, help="write the checkpoint every N steps")
    t.add_argument("--resume", type=_path, help="continue training from this checkpoint (same model, data and seed)")

    o = p.add_argument_group("output")
    o.add_argument("--output", type=_path, help="save the quantized model to this folder")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output")
    o.add_argument("--tables", choices=TABLE_DTYPES, default=DEFAULTS.tables,
                   help="how the quantized model stores its embedding and lm_head, in memory as in --output "
                        "(int8: per row, lm_head input int8 per token; a tied model keeps one table)")


def config_from_args(a: argparse.Namespace) -> RunConfig:
    """Flags → RunConfig (validated)."""
    cfg = RunConfig(model=a.model, seed=a.seed, device=getattr(a, "device", "auto"),
                    offload=getattr(a, "offload", False), verify=not getattr(a, "no_verify", False),
                    threads=getattr(a, "threads", None))
    cfg.eval = replace(cfg.eval, data=a.eval_data, seq_len=a.seq_len, max_windows=a.max_windows)
    if getattr(a, "tasks", None):
        from .evaluation.lm_eval_bridge import check_tasks, parse_tasks

        cfg.eval = replace(cfg.eval, tasks=check_tasks(parse_tasks(a.tasks)), task_limit=a.task_limit)
    if not hasattr(a, "w_bits"):
        return cfg.validate()
    cfg.quant = QuantConfig(
        weight=QuantSpec(a.w_bits, symmetric=not a.w_asym, group_size=a.w_group, clip_search=not a.no_w_clip_search,
                         full_range=a.w_full_range),
        act=QuantSpec(a.a_bits, symmetric=a.a_sym, group_size=a.a_group, clip_ratio=a.a_clip),
        key=QuantSpec(a.kv_bits if a.k_bits is None else a.k_bits, symmetric=False, clip_ratio=a.kv_clip),
        value=QuantSpec(a.kv_bits if a.v_bits is None else a.v_bits, symmetric=False, clip_ratio=a.kv_clip),
        weight_method=a.weight_quant, weight_role_bits=a.w_bits_role,
    )
    # compare picks each row's rotation from --methods; a --rotation-file there is the learned row's.
    mode = RotationMode.LEARNED if getattr(a, "methods", None) and a.rotation_file else a.rotation
    cfg.rotation = replace(cfg.rotation, mode=mode, r1=not a.no_r1, r3=not a.no_r3, r4=not a.no_r4,
                           rotation_file=a.rotation_file, save_file=a.save_rotation)
    preset = dict(TRAIN_PRESETS[a.train_preset])
    for key, flag in (("steps", a.train_steps), ("seq_len", a.train_seq_len), ("batch", a.train_batch), ("lr", a.lr)):
        if flag is not None:
            preset[key] = flag
    cfg.train = replace(cfg.train, calib_data=a.calib_data, checkpoint=a.train_checkpoint or a.resume,
                        checkpoint_every=a.train_checkpoint_every or 0, resume=a.resume, loss=a.train_loss,
                        act_ste=a.train_ste, for_gptq={"auto": None, "float": True, "grid": False}[a.train_weights],
                        **preset)
    cfg.gptq = replace(cfg.gptq, calib_data=a.calib_data, samples=a.gptq_samples, seq_len=a.gptq_seq_len,
                       act_order=a.gptq_act_order, weighted_clip=a.gptq_weighted_clip,
                       damp=a.gptq_damp, act_aware=a.gptq_act_aware,
                       float_targets=a.gptq_float_targets)
    cfg.tune = replace(cfg.tune, steps=a.tune_scales, lr=a.tune_lr, calib_data=a.calib_data)
    cfg.output, cfg.overwrite, cfg.tables = a.output, a.overwrite, a.tables
    check_calibration_differs(cfg.train.calib_data, cfg.eval.data)
    cfg.validate()
    _check_side_outputs(cfg)
    return cfg


def _check_side_outputs(cfg: RunConfig) -> None:
    """Files written during or after the work (rotations, training checkpoint) must be writable now, not
    after an hour of training; the training checkpoint to resume from must be a file."""
    from pathlib import Path

    from .io import check_writable

    if cfg.train.resume and Path(cfg.train.resume).is_dir():
        raise SpinQuantError(f"--resume {cfg.train.resume} is a directory; pass the checkpoint file written by "
                             "--train-checkpoint")
    if cfg.rotation.save_file:
        check_writable(Path(cfg.rotation.save_file), cfg.overwrite, directory=False)
    stem = cfg.loss_curve_stem()
    if stem:
        from .training.loop import loss_curve_files

        for f in loss_curve_files(stem):
            check_writable(f, cfg.overwrite, directory=False)
    ckpt = cfg.train.checkpoint
    if ckpt and cfg.rotation.mode == RotationMode.LEARNED and not cfg.rotation.rotation_file and ckpt != cfg.train.resume:
        # A file there already is the user's (training then rewrites its own checkpoint on every save).
        check_writable(Path(ckpt), cfg.overwrite, directory=False)


def build_parser(target: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `target`, quantize's defaults are that target's recipe (config.TARGETS)."""
    p = _Parser(prog="spinquant", description="Rotate and quantize LLMs to 4 bits (SpinQuant).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="rotate + quantize a model, report its perplexity, optionally save it")
    add_model_args(q)
    add_quant_args(q)
    add_eval_args(q)
    add_export_args(q)
    q.add_argument("--target", choices=sorted(TARGETS),
                   help="the recipe that measured best for a serving format: sets the quantization and export "
                        "flags (any given explicitly still win); a GGUF target writes --output as that file, e.g. "
                        "--target gguf:Q4_0 --output model.gguf; spinquant:<bits> is the most accurate recipe "
                        "measured for our packed runtime (GPTQ and scale tuning: slow)")
    if target:
        q.set_defaults(**TARGETS[target])

    e = sub.add_parser("eval", help="evaluate the floating-point model, or a folder saved by quantize --output")
    add_model_args(e)
    add_eval_args(e)
    e.add_argument("path", nargs="?", type=_path, help="model folder (same as --model), e.g. a saved quantized model")
    add_verify_arg(e)

    for name, text in (("generate", "continue a prompt with a model (a saved quantized folder or any model)"),
                       ("chat", "chat on stdin/stdout with a model; EOF or 'exit' ends it")):
        g = sub.add_parser(name, help=text)
        g.add_argument("model", type=_path, help="model folder (e.g. from quantize --output), .gguf file, hub id or built-in")
        if name == "generate":
            g.add_argument("prompt", help="text to continue")
        g.add_argument("--max-new-tokens", type=_positive, default=64 if name == "generate" else 256,
                       help="tokens to generate" + (" per answer" if name == "chat" else "") +
                            " (stops earlier at the end of text or of the model's context)")
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
        add_threads_arg(g)
        add_verify_arg(g)
        g.set_defaults(eval_data="wikitext2", seq_len=2048, max_windows=16)  # unused; config_from_args reads them

    c = sub.add_parser("compare", help="FP / RTN / Hadamard / learned side by side in one table")
    add_model_args(c)
    add_quant_args(c)
    add_eval_args(c)
    c.add_argument("--methods", default="fp,rtn,hadamard",
                   help="comma list of fp, rtn (no rotation), hadamard, random, learned")
    c.add_argument("--markdown", type=_path, help="also write the table as Markdown to this file")
    c.add_argument("--plot", type=_path, help="also write a PNG chart (perplexity, log scale; accuracy with --tasks; speed "
                                  "against size) to this file, and the Markdown table beside it")
    c.add_argument("--no-cost", action="store_true",
                   help="skip the inference-cost columns (size, peak memory, prefill and decode tokens/s)")
    c.add_argument("--cost-prompt", type=_positive, default=128, help="prompt tokens timed for prefill")
    c.add_argument("--cost-decode", type=_positive, default=32, help="tokens timed for decode")

    x = sub.add_parser("export", help="write a folder saved by quantize --output as compressed-tensors or GGUF")
    x.add_argument("model", metavar="SRC", type=_path, help="quantized model folder from spinquant quantize --output")
    x.add_argument("--format", required=True, choices=("compressed-tensors", "gguf"),
                   help="compressed-tensors (vLLM, transformers) or gguf (llama.cpp; needs --no-r3 --no-r4)")
    x.add_argument("--output", required=True, type=_path, help="folder (compressed-tensors) or .gguf file to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    from .export import DTYPE_CHOICES, WEIGHT_TYPES

    x.add_argument("--gguf-type", choices=WEIGHT_TYPES, default="Q8_0", help="GGUF weight type (default Q8_0)")
    x.add_argument("--gguf-tables", choices=[t for t in WEIGHT_TYPES if t != "auto"],
                   help="GGUF embedding / output type (default Q8_0, F16 for an F16 export)")
    x.add_argument("--export-dtype", choices=DTYPE_CHOICES, default="bfloat16",
                   help="compressed-tensors: dtype of scales and float tensors")
    x.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    add_verify_arg(x)
    x.set_defaults(eval_data="wikitext2", seq_len=2048, max_windows=16, seed=0)  # unused; config_from_args reads them
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags → namespace; a quantize --target is parsed a second time with its recipe as the defaults."""
    args = build_parser().parse_args(argv)
    if getattr(args, "target", None):
        args = build_parser(args.target).parse_args(argv)
        if "export" in TARGETS[args.target] and args.output and not args.export_output:
            args.export_output, args.output = args.output, None  # --output names the target's file
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if distributed.launched() and args.command != "quantize":
            raise SpinQuantError(f"only 'quantize' runs under torchrun (it trains rotations on every process); "
                                 f"run '{args.command}' as a single process")
        cfg = config_from_args(args)
        threads, note = distributed.pick_threads(cfg.threads)
        if note and sys.stderr.isatty():  # errors stay one line for scripts; people at a terminal see why
            print(f"spinquant: {note}", file=sys.stderr)
        if threads:
            import torch

            torch.set_num_threads(threads)
        result = COMMANDS[args.command](cfg, args)
    except SpinQuantError as e:
        print(f"spinquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spinquant: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    if args.json and distributed.is_main():
        print(json.dumps(result, default=str))
    return 0


def _quantize(cfg: RunConfig, args) -> dict:
    return api.run_quantize(cfg, evaluate=not args.no_eval,
                            export=export_request(args, args.export, args.export_output))


def _eval(cfg: RunConfig, args) -> dict:
    if getattr(args, "path", None):
        cfg = replace(cfg, model=args.path)
    return api.run_eval(cfg)


def _generate(cfg: RunConfig, args) -> dict:
    return api.run_generate(args.model, args.prompt, args.max_new_tokens, args.temperature, args.seed,
                            verify=cfg.verify)


def _chat(cfg: RunConfig, args) -> dict:
    return api.run_chat(args.model, args.max_new_tokens, args.temperature, args.seed, verify=cfg.verify)


def _compare(cfg: RunConfig, args) -> dict:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cost = None if args.no_cost else {"prompt_len": args.cost_prompt, "decode_tokens": args.cost_decode}
    return api.run_compare(cfg, methods, markdown=args.markdown, plot=args.plot, cost=cost)


def _export(cfg: RunConfig, args) -> dict:
    return api.run_export(args.model, export_request(args, args.format, args.output), verify=cfg.verify)


COMMANDS = {"quantize": _quantize, "eval": _eval, "compare": _compare, "generate": _generate, "chat": _chat,
            "export": _export}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
