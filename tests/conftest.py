import pytest
import torch

CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def devices():
    return ["cpu", "cuda"] if CUDA else ["cpu"]


@pytest.fixture(params=devices())
def device(request):
    return torch.device(request.param)


def random_tensor(shape, dtype, device, generator=None):
    """Random contents for any dtype, including bool and float8 (generated as bytes, so every bit pattern occurs)."""
    numel = 1
    for s in shape:
        numel *= s
    if dtype == torch.bool:
        return (torch.randint(0, 2, shape, generator=generator) == 1).to(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    t = raw.view(dtype).reshape(shape)
    if dtype.is_floating_point:
        # NaN payloads compare unequal; bit-exactness is checked on the bytes anyway, but keep values finite
        t = torch.where(torch.isfinite(t.float()), t, torch.zeros((), dtype=dtype))
    return t.to(device).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a = a.detach().contiguous().cpu()
    b = b.detach().contiguous().cpu()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def tensors_to_bytes(tensors: dict) -> bytes:
    """Serialized for a multiprocessing queue: a tensor put on a torch.multiprocessing queue travels as a handle to
    the sender's shared memory, which is gone once a sender that exits right after putting it has exited."""
    import io

    buf = io.BytesIO()
    torch.save({n: t.detach().cpu() for n, t in tensors.items()}, buf)
    return buf.getvalue()


def tensors_from_bytes(data: bytes) -> dict:
    import io

    return torch.load(io.BytesIO(data), weights_only=True)
