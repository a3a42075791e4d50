# Re-creates tests/data/tfds/moceir_tiny_clean (needs tensorflow-cpu at build time only;
# reading it back needs no TensorFlow). Usage: python make_moceir_tiny_clean.py tests/data/tfds
# Builds a tiny TFDS dataset (ArrayRecord) with an Image feature; needs TensorFlow only to write.
import numpy as np, tensorflow_datasets as tfds, sys
from skimage import data as skdata
class MoceirTinyClean(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "name": tfds.features.Text()}))
  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}
  def _generate_examples(self):
    imgs = {"astronaut": skdata.astronaut()[::8, ::8], "coffee": skdata.coffee()[::8, ::8],
            "chelsea": skdata.chelsea()[::6, ::6]}
    for i, (n, im) in enumerate(imgs.items()):
      yield i, {"image": np.ascontiguousarray(im), "name": n}
MoceirTinyClean(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
