"""The segmenter: one loaded nnU-Net v2 model, arrays in, label maps out.

Built once per worker and kept loaded. The network is built from the plans
(``get_network_from_plans``) and handed to ``nnUNetPredictor.manual_initialization``: nnU-Net's
trainer lookup by name imports every trainer module, some of which need torchvision/timm.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from dicom_node.errors import ModelError
from inference.log_context import LabelFilter
from inference.model_store import ModelInfo, ModelPart

if TYPE_CHECKING:
    from dicom_node.config import InferenceSettings

logger = logging.getLogger(__name__)
# In a job, each line names it (the worker's label): inference knows no jobs.
logger.addFilter(LabelFilter())

DeviceChoice = Literal["auto", "cuda", "mps", "cpu"]


@contextlib.contextmanager
def _no_pydicom() -> Iterator[None]:
    """Keep pydicom out while nnU-Net imports: nibabel (via nnU-Net's readers) imports it when
    present, and ``inference`` must not pull in pydicom. Already-imported pydicom is untouched."""
    blocked = "pydicom" not in sys.modules
    if blocked:
        sys.modules["pydicom"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if blocked and sys.modules.get("pydicom", 0) is None:
            del sys.modules["pydicom"]


@contextlib.contextmanager
def _nnunet_output_to_log() -> Iterator[None]:
    """nnU-Net prints progress to stdout; turn it into debug log lines instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.debug("nnU-Net: %s", line.strip())


def pick_device(choice: DeviceChoice) -> torch.device:
    """``auto``: cuda, then mps, then cpu. An explicit device that is absent is an error."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError("inference.device is 'cuda' but no CUDA device is available; use 'auto'")
    if choice == "mps" and not mps_ok:
        raise ModelError("inference.device is 'mps' but MPS is not available; use 'auto'")
    return torch.device(choice)


def _load_checkpoint(path: Any) -> dict[str, Any]:
    """Weights-only load first (no code runs); full nnU-Net checkpoints hold other pickled
    objects and need ``weights_only=False``, acceptable for models an operator installed."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        logger.debug("checkpoint %s needs a full unpickle (weights_only=False)", path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelError(f"cannot load checkpoint {path}: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelError(f"checkpoint {path} has no 'network_weights': not an nnU-Net checkpoint")
    return ckpt


def _lookup_table(
    label_map: dict[int, int] | None, dtype: type[np.unsignedinteger[Any]]
) -> np.ndarray | None:
    """Network label id -> catalogue id as an array to index with the label map."""
    if not label_map:
        return None
    lut = np.zeros(max(label_map) + 1, dtype=dtype)
    for network_id, catalogue_id in label_map.items():
        lut[network_id] = catalogue_id
    return lut


@dataclass(frozen=True)
class _LoadedPart:
    part: ModelPart
    predictor: Any  # nnUNetPredictor, imported lazily
    lut: np.ndarray | None


@dataclass(frozen=True)
class _Options:
    device: torch.device
    tile_step_size: float
    use_mirroring: bool
    perform_everything_on_device: bool
    scores_back_limit_bytes: int


def model_spacing_zyx(predictor: Any) -> list[float]:
    """The spacing nnU-Net resamples to, in the order of the arrays it is given (its plans
    list it in their transposed order)."""
    configured = [float(v) for v in predictor.configuration_manager.spacing]
    forward = list(predictor.plans_manager.transpose_forward)
    spacing = [0.0] * len(configured)
    for i, axis in enumerate(forward):
        spacing[axis] = configured[i]
    return spacing


class Segmenter:
    """One loaded model. ``predict`` takes a (z, y, x) or (c, z, y, x) array and its spacing."""

    def __init__(
        self,
        model: ModelInfo,
        settings: InferenceSettings | None = None,
        *,
        device: DeviceChoice | None = None,
        tile_step_size: float | None = None,
        use_mirroring: bool | None = None,
        perform_everything_on_device: bool | None = None,
        cpu_threads: int | None = None,
    ) -> None:
        """Options: keyword argument, else ``settings`` (config.yaml ``inference``), else the
        model's descriptor (step size, mirroring), else nnU-Net's defaults."""
        self.model = model

        def pick(explicit: Any, from_settings: str, default: Any) -> Any:
            if explicit is not None:
                return explicit
            value = getattr(settings, from_settings, None) if settings is not None else None
            return default if value is None else value

        threads = int(pick(cpu_threads, "cpu_threads", 0))
        if threads > 0:  # 0 leaves torch's default
            torch.set_num_threads(threads)
        self.options = _Options(
            device=pick_device(pick(device, "device", "auto")),
            tile_step_size=float(
                pick(tile_step_size, "tile_step_size", model.descriptor.tile_step_size)
            ),
            use_mirroring=bool(
                pick(use_mirroring, "use_mirroring", model.descriptor.use_mirroring)
            ),
            perform_everything_on_device=bool(
                pick(perform_everything_on_device, "perform_everything_on_device", True)
            ),
            scores_back_limit_bytes=int(pick(None, "scores_back_limit_mb", 2048)) * 1024 * 1024,
        )
        started = time.perf_counter()
        self.output_dtype: type[np.unsignedinteger[Any]] = (
            np.uint8 if model.catalogue.max_id <= 255 else np.uint16
        )
        self._parts = [
            _LoadedPart(
                part,
                self._build(part, self.options),
                _lookup_table(part.label_map, self.output_dtype),
            )
            for part in model.parts
        ]
        logger.info(
            "model %s loaded in %.2f s: device %s, %sfolds %s, step %.2f, mirroring %s",
            model.name,
            time.perf_counter() - started,
            self.options.device,
            f"{len(model.parts)} parts, " if model.has_parts else "",
            model.folds_text(),
            self.options.tile_step_size,
            self.options.use_mirroring,
        )

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def input_channels(self) -> int:
        return len(self.model.descriptor.input_channels)

    def _build(self, part: ModelPart, options: _Options) -> Any:
        with _no_pydicom():
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
            from nnunetv2.utilities.label_handling.label_handling import (
                determine_num_input_channels,
            )
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        what = f"model {self.model.name}" + (f" part {part.name}" if self.model.has_parts else "")
        try:
            plans = json.loads((part.nnunet_dir / "plans.json").read_text(encoding="utf-8"))
            dataset = json.loads((part.nnunet_dir / "dataset.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{what}: cannot read plans/dataset json: {exc}") from exc

        checkpoints = [_load_checkpoint(p) for p in part.checkpoint_paths]
        first = checkpoints[0]
        init_args = first.get("init_args") or {}
        configuration = (
            part.configuration or init_args.get("configuration") or first.get("configuration")
        )
        if not configuration:
            raise ModelError(
                f"{what}: the configuration (e.g. 3d_fullres) is neither in model.yaml "
                "nor in the checkpoint; add `configuration:` to model.yaml"
            )
        trainer_name = str(first.get("trainer_name") or part.trainer or "nnUNetTrainer")
        mirror_axes = first.get("inference_allowed_mirroring_axes")

        plans_manager = PlansManager(plans)
        try:
            cfg = plans_manager.get_configuration(configuration)
        except (KeyError, RuntimeError) as exc:
            raise ModelError(f"{what}: configuration {configuration!r} not in plans.json") from exc
        num_inputs = determine_num_input_channels(plans_manager, cfg, dataset)
        if num_inputs != self.input_channels:
            raise ModelError(
                f"{what}: model.yaml lists {self.input_channels} input channels, "
                f"the network takes {num_inputs}"
            )
        label_manager = plans_manager.get_label_manager(dataset)
        network = get_network_from_plans(
            cfg.network_arch_class_name,
            cfg.network_arch_init_kwargs,
            cfg.network_arch_init_kwargs_req_import,
            num_inputs,
            label_manager.num_segmentation_heads,
            allow_init=False,
            deep_supervision=False,
        )
        parameters = [c["network_weights"] for c in checkpoints]
        try:
            # Checked here so a trainer with a custom network fails at load, not mid-job.
            network.load_state_dict(parameters[0])
        except RuntimeError as exc:
            raise ModelError(
                f"{what}: weights do not fit the network in plans.json (trainer "
                f"{trainer_name} may build its own architecture): {exc}"
            ) from exc

        with _nnunet_output_to_log():
            predictor = nnUNetPredictor(
                tile_step_size=options.tile_step_size,
                use_gaussian=True,
                use_mirroring=options.use_mirroring,
                perform_everything_on_device=options.perform_everything_on_device,
                device=options.device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            predictor.manual_initialization(
                network,
                plans_manager,
                cfg,
                parameters,
                dataset,
                trainer_name,
                tuple(mirror_axes) if mirror_axes is not None else None,
            )
        return predictor

    def predict(self, volume: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
        """Label map of ``volume`` with exactly its (z, y, x) shape.

        nnU-Net resamples to the model's spacing and back itself; ``spacing_zyx`` is in mm.
        """
        data = np.asarray(volume)
        if data.ndim == 3:
            data = data[np.newaxis]
        if data.ndim != 4:
            raise ValueError(f"volume must be (z, y, x) or (c, z, y, x), got shape {volume.shape}")
        if data.shape[0] != self.input_channels:
            raise ValueError(
                f"model {self.model.name} takes {self.input_channels} channel(s) "
                f"{self.model.descriptor.input_channels}, got {data.shape[0]}"
            )
        spacing = [float(s) for s in spacing_zyx]
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing_zyx must be three positive numbers, got {spacing_zyx}")
        data = np.ascontiguousarray(data, dtype=np.float32)
        if not np.isfinite(data).all():
            raise ValueError("volume holds NaN or infinite values")

        started = time.perf_counter()
        combined: np.ndarray | None = None
        label_input = self.model.descriptor.roi_model is not None
        for index, loaded in enumerate(self._parts, start=1):
            part_started = time.perf_counter()
            if label_input:
                seg = self._predict_on_model_grid(loaded.predictor, data, spacing)
            else:
                seg = np.asarray(self._predict_with_fallback(loaded.predictor, data, spacing))
            if seg.shape != data.shape[1:]:
                raise ModelError(
                    f"model {self.model.name} returned shape {seg.shape} for input {data.shape[1:]}"
                )
            labels = seg.astype(self.output_dtype) if loaded.lut is None else loaded.lut[seg]
            if combined is None:
                combined = labels
            else:
                # As TotalSegmentator combines its parts: a later part's label wins.
                np.copyto(combined, labels, where=labels != 0)
            if self.model.has_parts:
                logger.info(
                    "model %s part %d/%d (%s) done in %.2f s",
                    self.model.name,
                    index,
                    len(self._parts),
                    loaded.part.name,
                    time.perf_counter() - part_started,
                )
        assert combined is not None  # a model has at least one part
        logger.info(
            "model %s segmented %s at spacing %s in %.2f s",
            self.model.name,
            data.shape[1:],
            tuple(round(s, 3) for s in spacing),
            time.perf_counter() - started,
        )
        return combined

    def _predict_on_model_grid(
        self, predictor: Any, data: np.ndarray, spacing: list[float]
    ) -> np.ndarray:
        """For a model whose second channel is a label map (another model's segmentation):
        both channels resampled to the model's spacing first, the image as nnU-Net resamples
        images, the label map by nearest neighbour (as TotalVibeSegmentator's own pipeline
        does); nnU-Net would interpolate the label values as intensities. The label map
        predicted on that grid comes back by nearest neighbour too."""
        from nnunetv2.preprocessing.resampling.default_resampling import (
            compute_new_shape,
            resample_data_or_seg_to_shape,
        )

        target = model_spacing_zyx(predictor)
        shape = data.shape[1:]
        new_shape = compute_new_shape(shape, spacing, target)
        image = resample_data_or_seg_to_shape(
            data[:1], new_shape, spacing, target, is_seg=False, order=3, order_z=0
        )
        labels = resample_data_or_seg_to_shape(
            data[1:], new_shape, spacing, target, is_seg=True, order=0, order_z=0
        )
        on_grid = np.concatenate([image, labels.astype(np.float32)]).astype(np.float32)
        seg = np.asarray(self._predict_with_fallback(predictor, on_grid, list(target)))
        back = resample_data_or_seg_to_shape(
            seg[np.newaxis], shape, target, spacing, is_seg=True, order=0, order_z=0
        )
        return np.asarray(back[0])

    @staticmethod
    def _run(predictor: Any, data: np.ndarray, spacing: list[float]) -> np.ndarray:
        with _nnunet_output_to_log():
            result = predictor.predict_single_npy_array(data, {"spacing": spacing})
        return np.asarray(result)

    def _run_sized(self, predictor: Any, data: np.ndarray, spacing: list[float]) -> np.ndarray:
        """``_run``, or, where nnU-Net's scores of every label on this grid would take more
        than ``inference.scores_back_limit_mb``, the same label map made one label at a time
        (``inference.scores_back``)."""
        from inference.scores_back import predict_by_label, scores_bytes_back

        needed = scores_bytes_back(predictor, data.shape[1:])
        if needed <= self.options.scores_back_limit_bytes:
            return self._run(predictor, data, spacing)
        logger.info(
            "model %s: the scores of its %d labels on the grid %s would take %.1f GB "
            "(inference.scores_back_limit_mb %d): brought back one label at a time",
            self.model.name,
            predictor.label_manager.num_segmentation_heads,
            tuple(data.shape[1:]),
            needed / 1e9,
            self.options.scores_back_limit_bytes // (1024 * 1024),
        )
        with _nnunet_output_to_log():
            return predict_by_label(predictor, data, spacing)

    def _predict_with_fallback(
        self, predictor: Any, data: np.ndarray, spacing: list[float]
    ) -> np.ndarray:
        """CUDA out of memory: retry with logits on the CPU, then entirely on the CPU."""
        try:
            return self._run_sized(predictor, data, spacing)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            logger.warning(
                "model %s: CUDA out of memory for %s; retrying with results on the CPU",
                self.model.name,
                data.shape[1:],
            )
        torch.cuda.empty_cache()
        saved = predictor.perform_everything_on_device
        predictor.perform_everything_on_device = False
        try:
            return self._run_sized(predictor, data, spacing)
        except torch.cuda.OutOfMemoryError:
            logger.warning(
                "model %s: still out of CUDA memory; running this volume on the CPU",
                self.model.name,
            )
        finally:
            predictor.perform_everything_on_device = saved
        torch.cuda.empty_cache()
        predictor.device = torch.device("cpu")
        predictor.perform_everything_on_device = False
        try:
            return self._run_sized(predictor, data, spacing)
        finally:
            # The next volume may fit again: go back to the GPU.
            predictor.device = self.device
            predictor.perform_everything_on_device = saved
            predictor.network.to(self.device)
            torch.cuda.empty_cache()
