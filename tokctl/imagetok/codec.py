"""`tokctl tokenize-image encode IMG... --out DIR` and `decode TOKFILE... --out DIR`.

Each input is handled on its own: a file that will not open, a truncated token file or one made
by another tokenizer is reported in one line, the others are still written, and the exit status
is 1 when any input failed (2 for a usage mistake, such as a missing --out).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import click
import numpy as np
import torch
import typer
from PIL import Image

from tokctl.console import console, err_console
from tokctl.errors import UserError
from tokctl.imagetok import tokfile
from tokctl.imagetok.checkpoint import EMBEDDED, LoadedTokenizer, load_tokenizer
from tokctl.imagetok.data import open_rgb, to_image, to_tensor

BATCH = 32


def _unique(out: Path, stem: str, suffix: str, taken: set[str]) -> Path:
    name, i = f"{stem}{suffix}", 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}{suffix}"
    taken.add(name)
    return out / name


def _report(path, message: str) -> None:
    err_console.print(f"[bold red]error:[/] {path}: {message}", soft_wrap=True, markup=True)


def check_budget(tok: LoadedTokenizer, tokens: Optional[int]) -> int:
    model = tok.model
    if tokens is None:
        return model.max_tokens
    if not 1 <= tokens <= model.max_tokens:
        raise UserError(f"--tokens {tokens}: this tokenizer ({tok.name}) makes 1 to "
                        f"{model.max_tokens} tokens per image")
    if not model.variable_length and tokens != model.max_tokens:
        raise UserError(f"--tokens {tokens}: {tok.name} is a fixed-length tokenizer "
                        f"({model.max_tokens} tokens); use a variable-length one (onedpiece, "
                        f"flexnested) for fewer")
    return tokens


def encode_images(tok: LoadedTokenizer, images: list[Image.Image], tokens: int) -> list[bytes]:
    """RGB images of any size -> token file bytes. Each image is resized (aspect not kept) to
    the tokenizer's square input; its original size goes in the header."""
    size = tok.model.image_size
    out = []
    for start in range(0, len(images), BATCH):
        chunk = images[start:start + BATCH]
        x = torch.stack([to_tensor(im.resize((size, size), Image.LANCZOS)) for im in chunk])
        ids = tok.model.encode(x)[:, :tokens].numpy()
        for im, row in zip(chunk, ids):
            tf = tokfile.TokenFile(tokfile.KINDS.get(tok.name, tokfile.OTHER_KIND), tok.hash,
                                   im.size[0], im.size[1], row)
            out.append(tokfile.dumps(tf, tok.model.codebook_size))
    return out


def decode_files(tok: LoadedTokenizer, files: list[tokfile.TokenFile]) -> list[Image.Image]:
    """Parsed token files -> RGB images at their original sizes (same token counts batched)."""
    out: list[Image.Image | None] = [None] * len(files)
    by_count: dict[int, list[int]] = {}
    for i, tf in enumerate(files):
        by_count.setdefault(len(tf.tokens), []).append(i)
    for count, idx in by_count.items():
        for start in range(0, len(idx), BATCH):
            part = idx[start:start + BATCH]
            ids = torch.from_numpy(np.stack([files[i].tokens for i in part]).astype(np.int64))
            recon = tok.model.decode(ids)
            for i, img in zip(part, recon):
                im = to_image(img)
                size = (files[i].width, files[i].height)
                out[i] = im if im.size == size else im.resize(size, Image.BICUBIC)
    return out  # type: ignore[return-value]


def parse_token_file(tok: LoadedTokenizer, path: Path) -> tokfile.TokenFile:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise tokfile.TokenFileError(f"cannot read ({exc.strerror or exc})") from None
    tf = tokfile.loads(data, tok.model.codebook_size, expect_hash=tok.hash)
    if len(tf.tokens) == 0 or len(tf.tokens) > tok.model.max_tokens:
        raise tokfile.TokenFileError(f"holds {len(tf.tokens)} tokens; this tokenizer decodes 1 to "
                                     f"{tok.model.max_tokens}")
    if not tok.model.variable_length and len(tf.tokens) != tok.model.max_tokens:
        raise tokfile.TokenFileError(f"holds {len(tf.tokens)} tokens; {tok.name} needs all "
                                     f"{tok.model.max_tokens}")
    if (tf.tokens >= tok.model.codebook_size).any():
        raise tokfile.TokenFileError("holds ids beyond this tokenizer's codebook")
    return tf


# ------------------------------------------------------------------------------------ commands
TOKENIZER_HELP = ("Tokenizer file (.pt), train run folder, TiTok release folder, or a shipped "
                  "tokenizer by name: default (1D, One-D-Piece) or vq2d (2D grid).")


def encode_command(images: List[Path] = typer.Argument(..., help="Images to encode."),
                   out: Path = typer.Option(..., "--out", "-o", help="Folder for the .tok files."),
                   tokens: Optional[int] = typer.Option(None, "--tokens", "-n",
                                                        help="Tokens per image (a prefix); "
                                                             "default: all."),
                   tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t",
                                                            help=TOKENIZER_HELP)) -> None:
    """Encode images into token files (one IMAGE.tok per image)."""
    tok = load_tokenizer(tokenizer)
    n = check_budget(tok, tokens)
    _make_out(out)
    opened, failed = [], 0
    for path in images:
        try:
            opened.append((path, open_rgb(path)))
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            failed += 1
    taken: set[str] = set()
    for start in range(0, len(opened), BATCH):
        chunk = opened[start:start + BATCH]
        for (path, _), data in zip(chunk, encode_images(tok, [im for _, im in chunk], n)):
            target = _unique(out, path.stem, ".tok", taken)
            _write(target, data)
            console.print(f"{target}  {len(data)} bytes", soft_wrap=True, highlight=False)
    _finish("encoded", len(opened), failed)


def _maker_of(files: List[Path]) -> LoadedTokenizer:
    """The shipped tokenizer whose hash the first readable token file carries (else the default)."""
    for path in files:
        try:
            tf, _, _ = tokfile.read_header(path.read_bytes())
        except (OSError, tokfile.TokenFileError):
            continue
        for name, weights in EMBEDDED.items():
            if weights.exists():
                tok = load_tokenizer(name)
                if tok.hash == tf.tokenizer_hash:
                    return tok
        break
    return load_tokenizer(None)


def decode_command(files: List[Path] = typer.Argument(..., help="Token files to decode."),
                   out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs."),
                   tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t",
                                                            help=TOKENIZER_HELP)) -> None:
    """Decode token files into PNG images (one FILE.png per token file). Without --tokenizer,
    the shipped tokenizer that made the first file decodes them all."""
    tok = load_tokenizer(tokenizer) if tokenizer is not None else _maker_of(files)
    _make_out(out)
    parsed, failed = [], 0
    for path in files:
        try:
            parsed.append((path, parse_token_file(tok, path)))
        except tokfile.TokenFileError as exc:
            _report(path, str(exc))
            failed += 1
    taken: set[str] = set()
    for start in range(0, len(parsed), BATCH):
        chunk = parsed[start:start + BATCH]
        for (path, _), im in zip(chunk, decode_files(tok, [tf for _, tf in chunk])):
            target = _unique(out, path.stem, ".png", taken)
            import io

            buf = io.BytesIO()
            im.save(buf, format="PNG")
            _write(target, buf.getvalue())
            console.print(str(target), soft_wrap=True, highlight=False)
    _finish("decoded", len(parsed), failed)


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None


def _write(path: Path, data: bytes) -> None:
    from tokctl.runs import atomic_write_bytes

    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None


def _finish(verb: str, done: int, failed: int) -> None:
    if failed:
        err_console.print(f"{verb} {done}, [bold red]{failed} failed[/]", soft_wrap=True)
        raise typer.Exit(1)


def _main(fn, prog: str, argv: list[str]) -> int:
    cmd = typer.main.get_command(_single(fn))
    try:
        # without standalone mode click returns an Exit's code instead of raising it
        code = cmd.main(argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        return 130
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2
    return code if isinstance(code, int) else 0


def _single(fn) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(fn)
    return app


def encode_main(argv: list[str]) -> int:
    return _main(encode_command, "tokctl tokenize-image encode", argv)


def decode_main(argv: list[str]) -> int:
    return _main(decode_command, "tokctl tokenize-image decode", argv)
