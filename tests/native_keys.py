"""Test helper: sparsesr state dicts renamed to other projects' key layouts (the inverse of the
mappings in sparsesr.models), for tests that load native checkpoints."""
import re


def renamed(sd: dict, rules: list[tuple[str, str]]) -> dict:
    """``sd`` with each key renamed by the first rule (a full-match regex, replacement) that fits."""
    out = {}
    for key, value in sd.items():
        for pattern, replacement in rules:
            key, n = re.subn(f"^{pattern}$", replacement, key)
            if n:
                break
        out[key] = value
    return out


def basicsr_edsr(sd: dict, n_resblocks: int) -> dict:
    """EDSR-PyTorch names -> BasicSR's EDSR (no mean-shift tensors: BasicSR keeps the mean as a constant)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("_mean.weight") and not k.endswith("_mean.bias")}
    return renamed(sd, [(r"head\.0\.(\w+)", r"conv_first.\1"), (r"body\.(\d+)\.body\.0\.(\w+)", r"body.\1.conv1.\2"),
                        (r"body\.(\d+)\.body\.2\.(\w+)", r"body.\1.conv2.\2"),
                        (rf"body\.{n_resblocks}\.(\w+)", r"conv_after_body.\1"),
                        (r"tail\.0\.(\d+)\.(\w+)", r"upsample.\1.\2"), (r"tail\.1\.(\w+)", r"conv_last.\1")])


def old_esrgan(sd: dict) -> dict:
    """BasicSR's RRDBNet names -> the original ESRGAN repository's (the inverse of ESRGAN_RENAMES)."""
    return renamed(sd, [(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(\w+)", r"RRDB_trunk.\1.RDB\2.conv\3.\4"),
                        (r"conv_body\.(\w+)", r"trunk_conv.\1"), (r"conv_up1\.(\w+)", r"upconv1.\1"),
                        (r"conv_up2\.(\w+)", r"upconv2.\1"), (r"conv_hr\.(\w+)", r"HRconv.\1")])
