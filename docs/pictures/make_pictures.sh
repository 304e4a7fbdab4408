#!/usr/bin/env bash
# Re-make the README pictures in docs/pictures/ with the commands they are named after.
#   docs/pictures/make_pictures.sh              # from the repository root, with the demo extra installed
# Model: the main job's runs/tiny_cpu/final.safetensors when it exists, else a random tips-tiny
# (MODEL="..." overrides, e.g. MODEL="--model tipsv2-b14" with released weights and heads).
# Depth / normals heads: DPT probes trained on the built-in scenes by `tipstorch eval --save-probes`.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/pictures
if [ -z "${MODEL:-}" ]; then
  if [ -f runs/tiny_cpu/final.safetensors ]; then MODEL="--model runs/tiny_cpu/final.safetensors"
  else MODEL="--model tips-tiny --random"; fi
fi
echo "model: $MODEL"
cp src/tipstorch/assets/example_scene.png "$OUT/example_scene.png"
python -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.coffee()).save('$OUT/coffee.png')"

# probes for the depth and normals pictures (short schedules on the built-in scenes, CPU minutes)
tipstorch eval $MODEL --tasks depth-dpt,normals-dpt --data scenes --probe-iterations 300 \
  --save-probes "$OUT/probes" --out "$OUT/probes/eval.json"

for image in "$OUT/example_scene.png" "$OUT/coffee.png"; do
  stem=$(basename "$image" .png)
  tipstorch pca "$image" $MODEL --out "$OUT"
  tipstorch pca "$image" $MODEL --fg-threshold 0.5 --out "$OUT/fg"
  mv "$OUT/fg/${stem}_pca.png" "$OUT/${stem}_pca_fg.png" && rmdir "$OUT/fg"
  tipstorch depth "$image" $MODEL --head "$OUT/probes/scenes_depth_dpt.safetensors" --out-dir "$OUT"
  tipstorch normals "$image" $MODEL --head "$OUT/probes/scenes_normals_dpt.safetensors" --out-dir "$OUT"
  rm -f "$OUT/${stem}_depth.npy" "$OUT/${stem}_normals.npy"
done
tipstorch segment "$OUT/example_scene.png" $MODEL --labels "sphere,star,floor" --out "$OUT/example_scene_segment.png"
tipstorch segment "$OUT/coffee.png" $MODEL --labels "cup,coffee,spoon,saucer,table" --out "$OUT/coffee_segment.png"
