"""The single source of truth for the datasets: official files, checksums, classes, image shape; and what a
dataset of the user's own image folders (`data.dataset: folders`) has in their place."""

from __future__ import annotations

from dataclasses import dataclass

from training.errors import ConfigError

IMAGE_SHAPE = (1, 28, 28)  # channels, height, width: what every model and the service take
NUM_PIXELS = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    urls: tuple[str, ...]  # official base URLs, tried in this order after any mirror
    sha256: dict[str, str]  # file name -> sha256 of the official .gz file
    class_names: tuple[str, ...]
    hflip_ok: bool  # whether a horizontally flipped image is still an image of its class
    upload_fit: int  # an uploaded object's longest side, in pixels, as the dataset was made
    folder: str = ""  # a dataset of image folders: its training folder

    @property
    def home(self) -> str:
        """Where its images come from, for MLflow's dataset inputs: the first official URL, or the folder."""
        return self.urls[0] if self.urls else self.folder

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.sha256)


TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={
            TRAIN_IMAGES: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            TRAIN_LABELS: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            TEST_IMAGES: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            TEST_LABELS: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        hflip_ok=True,
        upload_fit=28,  # Fashion-MNIST: trimmed products scaled to 28 on the longest side
    ),
    "mnist": DatasetSpec(
        name="mnist",
        # yann.lecun.com is the original home; the ossci copy is the one PyTorch uses when it is down.
        urls=(
            "http://yann.lecun.com/exdb/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
        sha256={
            TRAIN_IMAGES: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            TRAIN_LABELS: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            TEST_IMAGES: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            TEST_LABELS: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        class_names=tuple(str(d) for d in range(10)),
        hflip_ok=False,
        upload_fit=20,  # MNIST: digits fit a 20x20 box, centred in 28x28
    ),
}
FOLDERS = "folders"  # data.dataset for the user's own image folders (data.folders): classes from folder names
FOLDER_UPLOAD_FIT = 28  # an image folder's objects, like uploads, scaled to fill the input on the longest side
MIN_CLASSES, MAX_CLASSES = 2, 100


def folders_spec(name: str, train_folder: str, hflip_ok: bool) -> DatasetSpec:
    """A dataset of image folders: no files to fetch, and class names that only the folders can tell (the
    prepare stage reads them; every later stage takes them from its dataset card)."""
    return DatasetSpec(name, (), {}, (), hflip_ok, FOLDER_UPLOAD_FIT, train_folder)


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {[*sorted(DATASETS), FOLDERS]}") from None
