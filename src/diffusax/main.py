"""diffusax entry point: `python -m diffusax.main --config=configs/NAME.py --workdir=DIR`."""
import sys


def main(argv=None) -> int:
  print("diffusax.main: the training, sampling and evaluation programs are not built yet; "
        "only the pure diffusion core (diffusax.core) is available. Nothing was run.",
        file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
