"""Disk image paths (channels/images.py): no symlink on the way, nothing another user could
change, checked on the path (validation), as a missing image is created (the toolstack) and on
the descriptors of what is opened (blkback). No root needed: as root, a test gives a file away
to a stranger's uid; otherwise the stranger is simply some uid that is not ours."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from channels import images
from channels.images import ImageError

SIZE = 1 << 20
STRANGER = 4242  # a uid that is neither root nor the owner, when we are root


def image_in(tmp_path: Path) -> Path:
    """An image in a folder of its own (pytest's tmp_path is ours, 0700, under sticky /tmp)."""
    folder = tmp_path / "vm"
    folder.mkdir(mode=0o755)
    image = folder / "disk.img"
    image.write_bytes(bytes(SIZE))
    return image


def owner_for_a_strangers(path: Path) -> int:
    """Make ``path`` a stranger's: the owner to check it for, who is not its owner."""
    if os.getuid() == 0:
        os.chown(path, STRANGER, -1)
        return 0
    return os.getuid() + 1


def refused_everywhere(image: Path, owner: int, reason: str) -> None:
    """The validation, the creation and the open all refuse, naming ``reason``."""
    with pytest.raises(ImageError, match=reason):
        images.check(image, owner)
    with pytest.raises(ImageError, match=reason):
        images.create(image, SIZE, owner)
    with pytest.raises(ImageError, match=reason):
        os.close(images.open_image(image, os.O_RDWR, owner))


def test_an_image_of_ours_in_a_folder_of_ours_is_used(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    st = images.check(image, os.getuid())
    assert st is not None and st.st_size == SIZE
    fd = images.open_image(image, os.O_RDWR, os.getuid())
    try:
        assert os.fstat(fd).st_ino == image.stat().st_ino
        assert os.get_blocking(fd), "the loop device gets an ordinary descriptor"
    finally:
        os.close(fd)


def test_an_image_that_is_a_symlink_is_refused_saying_where_it_points(tmp_path: Path) -> None:
    real = image_in(tmp_path)
    link = real.parent / "link.img"
    link.symlink_to(real)
    refused_everywhere(link, os.getuid(), f"{link} is reached through a symlink: {link} -> {real}")


def test_an_image_under_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    real = image_in(tmp_path)
    folder = tmp_path / "elsewhere"
    folder.symlink_to(real.parent)
    image = folder / real.name
    refused_everywhere(image, os.getuid(), f"through a symlink: {folder} -> {real.parent}")


def test_a_missing_image_under_a_symlinked_folder_is_neither_created_nor_accepted(
    tmp_path: Path,
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    folder = tmp_path / "vm"
    folder.symlink_to(target)
    with pytest.raises(ImageError, match="through a symlink"):
        images.check(folder / "new" / "disk.img", os.getuid())
    with pytest.raises(ImageError, match="through a symlink"):
        images.create(folder / "new" / "disk.img", SIZE, os.getuid())
    assert list(target.iterdir()) == [], "nothing made at the symlink's target"


def test_an_image_that_belongs_to_another_user_is_refused(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    owner = owner_for_a_strangers(image)
    refused_everywhere(image, owner, f"{image} belongs to uid {image.stat().st_uid}; only root")


def test_a_folder_that_belongs_to_another_user_is_refused(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    owner = owner_for_a_strangers(image.parent)
    refused_everywhere(image, owner, f"{image}: {image.parent} belongs to uid")


def test_a_folder_every_user_can_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    image.parent.chmod(0o777)
    refused_everywhere(image, os.getuid(), f"{image.parent} is writable by every user")
    image.parent.chmod(0o1777)  # as /tmp: nobody can rename or remove another's entry
    assert images.check(image, os.getuid()) is not None
    os.close(images.open_image(image, os.O_RDONLY, os.getuid()))


def test_a_folder_a_group_can_write_is_refused(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    if os.getuid() == 0:
        os.chown(image.parent, -1, STRANGER)  # root's own group may write
    image.parent.chmod(0o775)
    refused_everywhere(image, os.getuid(), f"{image.parent} is writable by group")


def test_an_image_every_user_can_write_is_refused(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    image.chmod(0o666)
    with pytest.raises(ImageError, match=f"{image} is writable by every user"):
        images.check(image, os.getuid())
    with pytest.raises(ImageError, match="writable by every user"):
        images.open_image(image, os.O_RDWR, os.getuid())


def test_a_fifo_in_the_images_place_is_refused_without_hanging(tmp_path: Path) -> None:
    image = image_in(tmp_path)
    image.unlink()
    os.mkfifo(image)
    with pytest.raises(ImageError, match="not a regular file"):
        images.open_image(image, os.O_RDONLY, os.getuid())


def test_what_was_validated_is_checked_again_when_opened(tmp_path: Path) -> None:
    """Between the validation and blkback's open, the folder became a symlink."""
    image = image_in(tmp_path)
    assert images.check(image, os.getuid()) is not None
    moved = tmp_path / "moved"
    image.parent.rename(moved)
    image.parent.symlink_to(moved)
    with pytest.raises(ImageError, match=f"through a symlink: {image.parent} -> {moved}"):
        images.open_image(image, os.O_RDWR, os.getuid())


def test_a_missing_image_is_made_sparse_with_its_folders_and_removed_with_them(
    tmp_path: Path,
) -> None:
    image = tmp_path / "lib" / "images" / "disk.img"
    assert images.check(image, os.getuid()) is None, "missing, and nothing in the way"

    made = images.create(image, SIZE, os.getuid())

    assert made == [tmp_path / "lib", tmp_path / "lib" / "images", image]
    for folder in made[:2]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    st = image.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_size, st.st_blocks) == (0o600, SIZE, 0)
    assert images.create(image, SIZE, os.getuid()) == [], "an existing image is left alone"
    images.remove(made)
    assert not (tmp_path / "lib").exists()


def test_a_missing_image_is_not_made_under_a_folder_another_user_may_change(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(ImageError, match="writable by every user"):
        images.create(folder / "sub" / "disk.img", SIZE, os.getuid())
    assert list(folder.iterdir()) == []
