"""Tiny VLTP components built entirely offline (no Hub), small enough for tests, examples and CI on a CPU.

Everything here is deterministic: the same call returns the same vocabulary and the same preprocessing.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast, SamImageProcessorPil

from .processing_vltp import (
    DEFAULT_ANSWER,
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_QUESTION_TEMPLATE,
    VLTPProcessor,
    add_vltp_special_tokens,
)


TINY_VOCAB_SIZE = 500

# The tiny tokenizer learns its merges from LLaVA-1.5 chat prompts with LISA's question and answers around
# task-oriented queries (the 14 tasks of COCO-Tasks as VLTP phrases them, two in the style of RIO), plus LISA's other
# question forms. Any other text still tokenises, byte by byte.
_TASKS = [
    "step on",
    "sit comfortably",
    "place flowers",
    "get potatoes out of fire",
    "water plant",
    "get lemon out of tea",
    "dig hole",
    "open bottle of beer",
    "open parcel",
    "serve wine",
    "pour sugar",
    "smear butter",
    "extinguish fire",
    "pound carpet",
    "cut the food on the table",
    "hold the hot soup",
]
_ANSWERS = [DEFAULT_ANSWER, "It is [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG]."]
_CORPUS = [
    DEFAULT_PROMPT_TEMPLATE.format(question=DEFAULT_QUESTION_TEMPLATE.format(task=f"you can use the thing to {task}"))
    + f" {answer}</s>"
    for task in _TASKS
    for answer in _ANSWERS
] + [
    "Can you segment the cat in this image?",
    "Please segment the person in this image.",
    "What is the object in this image? Please respond with segmentation mask.",
    "Please output segmentation mask and explain why.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """
    A byte-level BPE tokenizer of `TINY_VOCAB_SIZE` tokens (plus `<image>` and `[SEG]`) trained on a built-in corpus.

    Like LLaMA's, it starts every text with `<s>`; its special tokens are `<s>`, `</s>`, `<pad>`, `<unk>` and
    `<image>`, and `[SEG]` is an added token (see `add_vltp_special_tokens`). Padding is on the right.
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
    )
    add_vltp_special_tokens(tokenizer)
    return tokenizer


def tiny_processor(sam_image_size: int = 128, clip_image_size: int = 32, clip_patch_size: int = 8) -> VLTPProcessor:
    """
    A [`VLTPProcessor`] with [`tiny_tokenizer`], a CLIP image processor at `clip_image_size` (shortest side resized,
    center crop, CLIP mean/std) and a SAM image processor at `sam_image_size` (longest side resized, padded square).

    The prompt gets `(clip_image_size // clip_patch_size) ** 2` image tokens (16 by default), the patch features of a
    CLIP vision tower of that image and patch size.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": clip_image_size}, crop_size={"height": clip_image_size, "width": clip_image_size}
    )
    sam_image_processor = SamImageProcessorPil(
        size={"longest_edge": sam_image_size}, pad_size={"height": sam_image_size, "width": sam_image_size}
    )
    return VLTPProcessor(
        image_processor,
        sam_image_processor,
        tiny_tokenizer(),
        num_image_tokens=(clip_image_size // clip_patch_size) ** 2,
    )
