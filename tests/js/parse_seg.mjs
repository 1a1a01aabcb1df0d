// Parse a DICOM-SEG with the parser OHIF uses (@cornerstonejs/adapters, Cornerstone3D
// Segmentation.createFromDICOMSegBuffer) and print, as JSON, what a viewer would overlay:
// per segment its label, stored CIELab colour, the RGB OHIF derives from it, and voxel count.
//
// Usage: node parse_seg.mjs SEG.dcm SOURCE1.dcm SOURCE2.dcm ...   (single-frame sources)
//
// No browser: the source images' metadata is served from their headers (read with dcmjs), the
// way OHIF's metadata store would, and the labelmaps live in cornerstone's in-memory cache.
import { readFileSync } from 'node:fs';

import { adaptersSEG } from '@cornerstonejs/adapters';
import { metaData } from '@cornerstonejs/core';
import dcmjs from 'dcmjs';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function readDataset(path) {
  const buffer = readFileSync(path);
  const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  const message = DicomMessage.readFile(arrayBuffer);
  return { arrayBuffer, dataset: DicomMetaDictionary.naturalizeDataset(message.dict) };
}

const asArray = (value) => (Array.isArray(value) ? value : [value]);

// The metadata modules cornerstone asks for, built from one source image header.
function modulesFor(ds) {
  const iop = asArray(ds.ImageOrientationPatient).map(Number);
  const spacing = asArray(ds.PixelSpacing).map(Number);
  return {
    instance: ds,
    imagePlaneModule: {
      frameOfReferenceUID: ds.FrameOfReferenceUID,
      rows: ds.Rows,
      columns: ds.Columns,
      imageOrientationPatient: iop,
      rowCosines: iop.slice(0, 3),
      columnCosines: iop.slice(3, 6),
      imagePositionPatient: asArray(ds.ImagePositionPatient).map(Number),
      pixelSpacing: spacing,
      rowPixelSpacing: spacing[0],
      columnPixelSpacing: spacing[1],
      sliceThickness: Number(ds.SliceThickness),
    },
    generalSeriesModule: {
      seriesInstanceUID: ds.SeriesInstanceUID,
      modality: ds.Modality,
    },
    generalImageModule: {
      sopInstanceUID: ds.SOPInstanceUID,
      instanceNumber: ds.InstanceNumber,
    },
    sopCommonModule: {
      sopInstanceUID: ds.SOPInstanceUID,
      sopClassUID: ds.SOPClassUID,
    },
    imagePixelModule: {
      rows: ds.Rows,
      columns: ds.Columns,
      samplesPerPixel: ds.SamplesPerPixel,
      photometricInterpretation: ds.PhotometricInterpretation,
      bitsAllocated: ds.BitsAllocated,
      bitsStored: ds.BitsStored,
      highBit: ds.HighBit,
      pixelRepresentation: ds.PixelRepresentation,
    },
  };
}

async function main() {
  const [segPath, ...sourcePaths] = process.argv.slice(2);
  if (!segPath || sourcePaths.length === 0) {
    console.error('usage: node parse_seg.mjs SEG.dcm SOURCE.dcm...');
    process.exit(2);
  }
  const store = new Map();
  const imageIds = sourcePaths.map((path, index) => {
    const imageId = `dicomfile:${index}`;
    store.set(imageId, modulesFor(readDataset(path).dataset));
    return imageId;
  });
  const provider = {
    get: (type, imageId) => store.get(imageId)?.[type],
    add: (imageId, type, value) => {
      store.set(imageId, { ...(store.get(imageId) ?? {}), [type]: value });
    },
  };
  // cornerstone's own metadata registry serves the derived labelmap images.
  metaData.addProvider((type, imageId) => provider.get(type, imageId), 10000);

  const { arrayBuffer } = readDataset(segPath);
  const started = performance.now();
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds,
    arrayBuffer,
    { metadataProvider: provider },
  );
  const parseMs = performance.now() - started;

  // Voxels per segment index over every labelmap group (overlapping segments get their own).
  const counts = new Map();
  for (const group of asArray(result.labelMapImages)) {
    for (const image of asArray(group)) {
      const pixels = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
      for (let i = 0; i < pixels.length; i++) {
        const value = pixels[i];
        if (value) counts.set(value, (counts.get(value) ?? 0) + 1);
      }
    }
  }
  const segments = [];
  asArray(result.segMetadata.data).forEach((segment, index) => {
    if (!segment) return; // index 0 is the background slot
    const lab = segment.RecommendedDisplayCIELabValue;
    segments.push({
      segmentNumber: Number(segment.SegmentNumber ?? index),
      label: segment.SegmentLabel,
      cielab: lab ? asArray(lab).map(Number) : null,
      // What OHIF does with the stored colour (dcmjs Colors.dicomlab2RGB, scaled to 0-255).
      rgb: lab
        ? dcmjs.data.Colors.dicomlab2RGB(asArray(lab).map(Number)).map((c) => Math.round(c * 255))
        : null,
      voxels: counts.get(index) ?? 0,
    });
  });
  const output = {
    segments,
    overlappingSegments: Boolean(result.overlappingSegments),
    parseMs: Math.round(parseMs),
  };
  process.stdout.write(`${JSON.stringify(output)}\n`);
}

main().catch((error) => {
  console.error(error?.stack ?? String(error));
  process.exit(1);
});
