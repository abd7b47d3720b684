from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def load_fixture(name: str):
    return torch.load(DATA / name, weights_only=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
