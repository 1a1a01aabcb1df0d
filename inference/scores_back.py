"""nnU-Net's label map of a large volume, its scores brought back one label at a time.

``nnUNetPredictor.predict_single_npy_array`` brings the scores of every label back from the
model's grid to the input's before its argmax: one float16 array of labels x voxels
(TotalSegmentator ``total``, 118 labels, on a 512 x 512 x 600 CT: 37 GB), after a float64
copy of every label's scores on the model's grid. A job on a usual CT died of memory.

Here the same steps run one label at a time with a running argmax (or, for a region-trained
model, the regions laid down in their order): nnU-Net resamples each label's scores on its
own, so the label map is the same, voxel for voxel, in a few volumes of memory. Only its
public pieces are used (preprocessing, sliding window, the configuration's resampling
function, the label manager); what ``convert_predicted_logits_to_segmentation_with_correct_
shape`` does after them is done here, in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def scores_bytes_back(predictor: Any, shape: tuple[int, ...]) -> int:
    """What nnU-Net's scores of every label take on the input's grid (float16)."""
    heads = int(predictor.label_manager.num_segmentation_heads)
    return heads * int(np.prod(shape)) * 2


def predict_by_label(predictor: Any, data: np.ndarray, spacing: list[float]) -> np.ndarray:
    """``predictor.predict_single_npy_array(data, {"spacing": spacing})``, in less memory."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy

    adapter = PreprocessAdapterFromNpy(
        [data],
        [None],
        [{"spacing": spacing}],
        [None],
        predictor.plans_manager,
        predictor.dataset_json,
        predictor.configuration_manager,
        num_threads_in_multithreaded=1,
        verbose=False,
    )
    item = next(adapter)
    logits = predictor.predict_logits_from_preprocessed_data(item["data"]).cpu()
    del item["data"]
    properties = item["data_properties"]
    plans, configuration = predictor.plans_manager, predictor.configuration_manager
    labels = predictor.label_manager

    # As convert_predicted_logits_to_segmentation_with_correct_shape resamples.
    forward = plans.transpose_forward
    spacing_transposed = [properties["spacing"][i] for i in forward]
    target_shape = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = (
        configuration.spacing
        if len(configuration.spacing) == len(target_shape)
        else [spacing_transposed[0], *configuration.spacing]
    )
    resample = configuration.resampling_fn_probabilities

    dtype = np.uint8 if len(labels.foreground_labels) < 255 else np.uint16
    segmentation = np.zeros(target_shape, dtype=dtype)
    best: np.ndarray | None = None
    for channel in range(logits.shape[0]):
        scores = np.asarray(
            resample(
                logits[channel : channel + 1], target_shape, current_spacing, spacing_transposed
            )
        )[0]
        if labels.has_regions:
            # Sigmoid per region, each laid over the earlier ones: as nnU-Net does.
            probability = labels.apply_inference_nonlin(torch.from_numpy(scores[np.newaxis]))[0]
            segmentation[probability.numpy() > 0.5] = labels.regions_class_order[channel]
        elif best is None:
            best = scores.copy()  # background's scores; its label is 0
        else:
            # Strictly greater: the first label wins a tie, as argmax has it.
            higher = scores > best
            segmentation[higher] = channel
            np.copyto(best, scores, where=higher)
        del scores
    del logits, best

    whole = np.zeros(properties["shape_before_cropping"], dtype=dtype)
    whole = insert_crop_into_image(whole, segmentation, properties["bbox_used_for_cropping"])
    if isinstance(whole, torch.Tensor):
        whole = whole.cpu().numpy()
    return np.asarray(whole.transpose(plans.transpose_backward))
