"""Compress a trained model into TFLite variants, measure them with LiteRT and pick the app's default.

    python -m quantize --model NAME_OR_PATH --recipe RECIPE [--out DIR] [--cache DIR]

MODEL is a registry name, a model folder or its card.json; the folder must hold the
float Keras model named in the card. RECIPE is a name in quantize/recipes/ (default,
release, release_fast, tiny) or a path to a recipe JSON. The run prunes, runs QAT and
pruning-preserving QAT, converts every variant of the recipe, evaluates each on the held-out split
through LiteRT, and writes into the model folder (or --out DIR, with a card of its
own): model_<variant>.tflite, card.json (variants, hashes, default variant and
why), report.md and compression.png. Same recipe + seed + model = same files.

Exit codes:
  0  done (and the recipe's acceptance criteria, if any, are met)
  2  the model, recipe or data cannot be used (message on stderr)
  3  done, files written, but the acceptance criteria are not met (see report.md)
  130 interrupted
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_INPUT, EXIT_NOT_ACCEPTED, EXIT_INTERRUPTED = 0, 2, 3, 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from model_zoo.dataset import DEFAULT_CACHE

    p = argparse.ArgumentParser(prog="python -m quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registry name, model folder or card.json")
    p.add_argument("--recipe", default="default", help="recipe name in quantize/recipes/ or a JSON path (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="write variants, card and report here instead of the model folder")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="prepared phantom-study cache (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from model_zoo.card import ModelError, resolve_model
    from model_zoo.litert import LiteRTError
    from quantize.recipe import RecipeError, load_recipe

    try:
        # Cheap checks first: a wrong name or a missing file should not wait for TensorFlow.
        recipe = load_recipe(args.recipe)
        card = resolve_model(args.model)
        if card.keras_file:
            card.verify(card.keras_file)
    except (ModelError, RecipeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT

    import tensorflow as tf

    from quantize.export import ExportError
    from quantize.pipeline import compress
    from quantize.sources import phantom_sources

    tf.config.experimental.enable_op_determinism()  # reproducible by seed
    try:
        result = compress(card, recipe, phantom_sources(card, recipe, args.cache), args.out)
    except (ModelError, RecipeError, LiteRTError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:  # e.g. a model folder this user cannot write to
        print(f"error: {exc.filename or 'the model folder'}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {len(result.files)} variants, {result.report_path} and {result.card.folder / 'card.json'}")
    print(f"default variant: {result.default_reason}")
    if not result.accepted:
        failed = [f"{c.name} ({c.detail})" for c in result.acceptance if not c.passed]
        print(f"acceptance NOT met for {recipe.acceptance.variant}: {'; '.join(failed)}", file=sys.stderr)
        return EXIT_NOT_ACCEPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
