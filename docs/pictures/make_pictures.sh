#!/usr/bin/env bash
# Re-make the README pictures in docs/pictures/ with the commands they are named after.
#   docs/pictures/make_pictures.sh              # from the repository root, with the demo extra installed
# Model for the bundled scene: the main job's runs/tiny_cpu/final.safetensors when it exists, else a random
# tips-tiny (MODEL="..." overrides, e.g. MODEL="--model tipsv2-b14" with released weights and heads); for
# the real photo a random tips-tiny (PHOTO_MODEL="..." overrides): a model trained on the scenes alone
# knows nothing of photos either.
# Depth / normals heads: DPT probes trained on the built-in scenes by `tipstorch eval --save-probes`.
# TIPSTORCH="python -m tipstorch.cli" runs a source checkout without installing it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/pictures
TIPSTORCH=${TIPSTORCH:-tipstorch}
if [ -z "${MODEL:-}" ]; then
  if [ -f runs/tiny_cpu/final.safetensors ]; then MODEL="--model runs/tiny_cpu/final.safetensors"
  else MODEL="--model tips-tiny --random"; fi
fi
PHOTO_MODEL=${PHOTO_MODEL:-"--model tips-tiny --random"}
echo "model: $MODEL; photo model: $PHOTO_MODEL"
cp src/tipstorch/assets/example_scene.png "$OUT/example_scene.png"
python -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.coffee()).save('$OUT/coffee.png')"

# probes for the depth and normals pictures (short schedules on the built-in scenes, CPU minutes);
# they are tens of MB, so they go to a temporary folder, not into docs/
PROBES=${PROBES:-$(mktemp -d)}
$TIPSTORCH eval $MODEL --tasks depth-dpt,normals-dpt --data scenes --probe-iterations "${PROBE_ITERATIONS:-300}" --probe-batch-size "${PROBE_BATCH_SIZE:-8}" \
  --save-probes "$PROBES" --out "$PROBES/eval.json"

for image in "$OUT/example_scene.png" "$OUT/coffee.png"; do
  stem=$(basename "$image" .png)
  model=$MODEL; [ "$stem" = coffee ] && model=$PHOTO_MODEL
  $TIPSTORCH pca "$image" $model --out "$OUT"
  $TIPSTORCH pca "$image" $model --fg-threshold 0.5 --out "$OUT/fg"
  mv "$OUT/fg/${stem}_pca.png" "$OUT/${stem}_pca_fg.png" && rmdir "$OUT/fg"
  $TIPSTORCH depth "$image" $model --head "$PROBES/scenes_depth_dpt.safetensors" --out-dir "$OUT"
  $TIPSTORCH normals "$image" $model --head "$PROBES/scenes_normals_dpt.safetensors" --out-dir "$OUT"
  rm -f "$OUT/${stem}_depth.npy" "$OUT/${stem}_normals.npy"
done
$TIPSTORCH segment "$OUT/example_scene.png" $MODEL --labels "sphere,star,floor" --out "$OUT/example_scene_segment.png"
$TIPSTORCH segment "$OUT/coffee.png" $PHOTO_MODEL --labels "cup,coffee,spoon,saucer,table" --out "$OUT/coffee_segment.png"
rm -f "$OUT/example_scene_segment.npy" "$OUT/coffee_segment.npy"  # the class maps; the pictures and JSON stay
python docs/pictures/screenshot_demo.py "$OUT/demo.png" $MODEL --depth-head "$PROBES/scenes_depth_dpt.safetensors" \
  --normals-head "$PROBES/scenes_normals_dpt.safetensors"
