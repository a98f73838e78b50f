"""The image side of a session (Llama 3.2 Vision programs): which image each user slot
holds, the vision function that writes it into the slot's cross-attention caches, and
the masks every prefill and decode call of the text functions takes. Torch-free.

Images are checked (opened, decoded, preprocessed) before any work, so a bad image
fails its request with one ValueError and other users are unaffected.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models_ref.vision_config import VisionConfig

from . import images, vision_inputs
from .vision_inputs import UserImage

TILE = 32


class ImageSlots:
    def __init__(self, session):
        self.session = session
        model = session.program.model
        self.vision = VisionConfig.from_json(model["vision"]) if model.get("vision") else None
        self._users: dict[int, UserImage | None] = {}
        if self.vision is not None:
            self.config = images.ImageConfig(tile_size=self.vision.tile_size, max_tiles=self.vision.max_num_tiles)
            state = session.program.state
            self.cache_names = [name for name, spec in state.items() if name.startswith("cross_attention_layers.")]
            self.cache_len = state[self.cache_names[0]].shape[2]

    @property
    def enabled(self) -> bool:
        return self.vision is not None

    @property
    def image_token_id(self) -> int:
        return self.vision.image_token_id

    # ------------------------------------------------------------------ checks
    def prepare(self, token_ids: list[int], image) -> images.ProcessedImage | None:
        """The preprocessed image for a prompt (None for none), or a ValueError saying why
        not: an image for a text-only program, a prompt whose <|image|> tokens do not
        match, a file that is not an image."""
        count = token_ids.count(self.image_token_id) if self.enabled else 0
        if image is None:
            if count:
                raise ValueError(f"the prompt has {count} <|image|> token(s) but no image was given")
            return None
        if not self.enabled:
            raise ValueError("this program has no vision function (compile a Llama 3.2 Vision model "
                             "for images); give image=None")
        if count != 1:
            raise ValueError(f"a prompt with an image needs exactly one <|image|> token, it has {count} "
                             "(one image per user)")
        if isinstance(image, (str, Path)) and not Path(image).exists():
            raise ValueError(f"image file {image} does not exist")
        return images.preprocess(image, self.config)

    # ------------------------------------------------------------------ device state
    def load(self, slot: int, token_ids: list[int], processed: images.ProcessedImage | None) -> None:
        """Run the vision function for the slot's image (or clear its caches)."""
        if not self.enabled:
            return
        if processed is None:
            self.session.backend.zero_state_rows(self.cache_names, slot)
            self._users[slot] = None
            return
        device = self.vision.replace(token_multiple=TILE)  # as models_ref.multimodal.device_vision
        semantic = self.vision.padded_tokens_per_tile
        mask = vision_inputs.encoder_mask(processed.aspect_ratio_mask, self.vision.tokens_per_tile, semantic,
                                          device.padded_tokens_per_tile)
        self.session.backend.run("vision", {"pixels": processed.pixel_values, "encoder_mask": mask},
                                 {"aspect_ratio_id": processed.aspect_ratio_id, "user_id": slot})
        self._users[slot] = UserImage.of(token_ids, processed, self.image_token_id,
                                         self.vision.tokens_per_tile, self.cache_len)

    def reset(self) -> None:
        self._users.clear()

    # ------------------------------------------------------------------ masks
    def _rows(self, slot: int, rows: np.ndarray):
        user = self._users.get(slot)
        if user is None:
            return vision_inputs.text_only_rows(len(rows), self.vision.vision_tokens, self.cache_len)
        return user.rows(rows)

    def prefill_inputs(self, slot: int, start: int, rows: int) -> dict:
        """Masks of prompt rows start..start+rows of the slot's user."""
        if not self.enabled:
            return {}
        return vision_inputs.batch_masks([self._rows(slot, np.arange(start, start + rows))])

    def decode_inputs(self, positions: np.ndarray) -> dict:
        """Masks of one decode step: each slot's last prompt row (HF repeats it)."""
        if not self.enabled:
            return {}
        last = np.array([10 ** 9])  # rows past the prompt repeat its last row
        return vision_inputs.batch_masks([self._rows(slot, last) for slot in range(len(positions))])
