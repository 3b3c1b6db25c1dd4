"""Push a VLTP model, and optionally its processor, to the Hugging Face Hub with a generated model card.

    python hub/push.py --model DIR --repo-id org/name [--processor DIR] [--base-model facebook/sam-vit-huge]
        [--metrics gIoU=0.612,cIoU=0.587 --metrics-dataset "RIO test, common split"] [--private] [--token TOKEN]

The repository gets the weights, the model files with an `auto_map` (so `trust_remote_code=True` works without this
package) and a README.md. Set HF_ENDPOINT to push somewhere other than huggingface.co.
"""

import argparse
import sys

from transformers import AutoModel

import modeling_vltp  # noqa: F401  (registers the VLTP model types with the Auto classes)
from modeling_vltp.hub import HubError, push_to_hub_with_card
from modeling_vltp.processing_vltp import VLTPProcessor


def parse_metrics(text: str) -> dict[str, float]:
    """`"gIoU=0.61,cIoU=0.58"` -> `{"gIoU": 0.61, "cIoU": 0.58}`."""
    metrics = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE pairs separated by commas, got {item!r}")
        metrics[name.strip()] = float(value)
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder of a saved VLTP model")
    parser.add_argument("--repo-id", required=True, help="target repository, e.g. org/vltp-sam-h")
    parser.add_argument("--processor", help="folder of a saved VLTPProcessor to push to the same repository")
    parser.add_argument("--base-model", help="Hub id of the weights the model starts from, for the card")
    parser.add_argument("--metrics", type=parse_metrics, help="evaluation results for the card, e.g. gIoU=0.61")
    parser.add_argument("--metrics-dataset", help="what the metrics were measured on (required with --metrics)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", help="Hub token (defaults to HF_TOKEN or the stored login)")
    args = parser.parse_args(argv)
    if args.metrics and not args.metrics_dataset:
        parser.error("--metrics needs --metrics-dataset: say which data the metrics were measured on")

    model = AutoModel.from_pretrained(args.model)
    try:
        print(
            push_to_hub_with_card(
                model,
                args.repo_id,
                token=args.token,
                private=args.private or None,
                base_model=args.base_model,
                metrics=args.metrics,
                metrics_dataset=args.metrics_dataset,
            )
        )
        if args.processor:
            processor = VLTPProcessor.from_pretrained(args.processor)
            print(push_to_hub_with_card(processor, args.repo_id, token=args.token, private=args.private or None))
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
