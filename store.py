"""The offline knowledge store (paper sec. 3.3): `--stage dump` computes the teacher side of Eq. (7) once per image and
flip state; `--stage distill --offline STORE` reads it back, so no teacher is built or run while the student trains.

A store is a folder: shard_<k>.bin files of fixed-size records (one per image and flip state, a numpy structured
dtype, so a shard is memory-mapped as an array of records; under torchrun rank r writes the shards k = r mod world),
shard_<k>.json (its image ids, flips and record CRCs; written after the .bin, so it marks the shard complete),
index.json (image id -> flip -> shard, slot, CRC) and manifest.json. A dump writes into <store>.partial/ and renames
it when complete; a killed dump resumes at its first unfinished shard, whose batches and random boxes are the same as
in an uninterrupted run.
"""
import hashlib
import json
import math
import os
import zlib

import numpy as np
import torch

import unikd
from utils import UserError, atomic_write, atomic_write_json, canonical_model_name, file_sha256

STORE_KIND = "unikd_knowledge_store"
STORE_VERSION = 2  # bumped whenever the record layout changes: an older store is refused
DUMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COCO_TRAIN_IMAGES, COCO_SIZE = 118287, (800, 1333)  # train2017 at the paper's resize, for storage projections


EMBEDDING_FIELDS = ("queries_ct", "queries_pos", "z_ct", "z_pos")


def record_layout(num_queries, d_model, dtype_name):
    """numpy dtype of one stored entry: the Knowledge of one (image, flip) plus the batched tensor size it refers to
    (padded_hw). Embeddings in the dump dtype (bf16 as its raw 16 bits: numpy has no bf16), boxes/points in fp32."""
    N, C = num_queries, d_model
    emb = {"fp16": "<f2", "bf16": "<u2", "fp32": "<f4"}[dtype_name]
    return np.dtype([(name, emb, (N, C)) for name in EMBEDDING_FIELDS] +
                    [("reference_ct", "<f4", (N, 2)), ("boxes", "<f4", (N, 4)), ("image_id", "<i8"),
                     ("padded_hw", "<i4", (2,)), ("pos_mask_ct", "u1", (N,)), ("pos_mask_pos", "u1", (N,)),
                     ("flip", "u1")])  # packed: no padding bytes, whose content numpy leaves undefined


def knowledge_to_records(knowledge, image_ids, flip, padded_hw, layout, dtype_name):
    """Knowledge of a batch (unikd.Knowledge, [B, ...]) -> numpy records [B] of `layout`."""
    records = np.zeros(len(image_ids), layout)
    for name in EMBEDDING_FIELDS:
        value = getattr(knowledge, name).detach().to("cpu", DUMP_DTYPES[dtype_name])
        records[name] = (value.view(torch.uint16) if dtype_name == "bf16" else value).numpy()
    records["reference_ct"] = knowledge.reference_ct.detach().float().cpu().numpy()
    records["boxes"] = knowledge.boxes.detach().float().cpu().numpy()
    records["pos_mask_ct"] = knowledge.pos_mask_ct.cpu().numpy()
    records["pos_mask_pos"] = knowledge.pos_mask_pos.cpu().numpy()
    records["image_id"], records["flip"], records["padded_hw"] = image_ids, int(flip), padded_hw
    return records


def records_to_knowledge(records, dtype_name, padded_hw, device):
    """numpy records [B] -> (unikd.Knowledge on device, embeddings in fp32). Points and boxes are rescaled from the
    batched tensor the teacher saw (each record's padded_hw) to the student's (padded_hw), so a normalised coordinate
    names the same pixel in both (README, "Feature levels"); the embeddings are exact only where the two sizes
    are equal."""
    def field(name):  # a fresh C-ordered copy: fields of packed records have strides torch cannot take
        return torch.from_numpy(records[name].copy(order="C"))

    def emb(name):
        t = field(name)
        return (t.view(torch.bfloat16) if dtype_name == "bf16" else t).to(device, torch.float32)
    scale = field("padded_hw").float() / torch.tensor(padded_hw, dtype=torch.float32)
    sx, sy = scale[:, 1, None, None], scale[:, 0, None, None]                         # [B, 1, 1]
    reference = field("reference_ct") * torch.cat([sx, sy], -1)
    boxes = field("boxes") * torch.cat([sx, sy, sx, sy], -1)
    return unikd.Knowledge(emb("queries_ct"), reference.to(device), emb("queries_pos"), boxes.to(device),
                           emb("z_ct"), emb("z_pos"), field("pos_mask_ct").to(device, torch.bool),
                           field("pos_mask_pos").to(device, torch.bool))


def weights_id(weights):
    """What identifies teacher weights in a manifest: the file's sha256, or the torchvision weights name."""
    return file_sha256(weights) if os.path.isfile(str(weights)) else str(weights)


class KnowledgeStore:
    """Reader of a --stage dump store: manifest and index in memory, shards memory-mapped on first use, every record
    checked against its CRC. Problems are one-line UserErrors naming the store and the fix."""

    def __init__(self, path):
        self.path = path
        manifest = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest):
            hint = (" (an unfinished dump: rerun the same --stage dump to complete it)"
                    if os.path.isdir(path + ".partial") or path.endswith(".partial") else "")
            raise UserError(f"--offline {path}: not a knowledge store (no manifest.json){hint}; pass the folder "
                            f"written by --stage dump")
        try:
            with open(manifest) as f:
                self.manifest = json.load(f)
            with open(os.path.join(path, "index.json")) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--offline {path}: unreadable manifest/index ({type(e).__name__}); dump it again")
        m = self.manifest
        if m.get("kind") != STORE_KIND or m.get("version") != STORE_VERSION:
            raise UserError(f"--offline {path}: not a version-{STORE_VERSION} knowledge store; dump it again")
        self.dtype = m["dtype"]
        self.layout = record_layout(m["num_queries"], m["d_model"], self.dtype)
        self.shards = {}

    def check(self, ake_file, ake_sha256, teacher, image_ids, flips):
        """Refuses, before any training, a store that does not belong to this AKE, teacher and dataset, or whose
        shards are truncated."""
        m, cfg = self.manifest, ake_file["config"]
        if (m["num_queries"], m["d_model"]) != (cfg["num_queries"], cfg["d_model"]):
            raise UserError(f"--offline {self.path}: stored N={m['num_queries']}, C={m['d_model']}, but the AKE has "
                            f"N={cfg['num_queries']}, C={cfg['d_model']}; dump the store with this AKE")
        if m["ake_sha256"] != ake_sha256:
            raise UserError(f"--offline {self.path} was dumped with another AKE ({m['ake']}) than the one given; "
                            f"pass that --ake or dump the store with yours")
        if teacher is not None and canonical_model_name(teacher, "--teacher") != m["teacher"]:
            raise UserError(f"--offline {self.path} holds the knowledge of teacher {m['teacher']}, not {teacher}; "
                            f"pass the matching --teacher or dump a store of {teacher}")
        for shard in m["shards"]:
            file = os.path.join(self.path, shard["file"])
            size = os.path.getsize(file) if os.path.isfile(file) else -1
            if size != shard["records"] * self.layout.itemsize:
                raise UserError(f"--offline {self.path}: shard {shard['file']} is truncated or missing ({size} bytes, "
                                f"expected {shard['records'] * self.layout.itemsize}); dump the store again")
        missing = [(i, f) for i in image_ids for f in flips if str(f) not in self.index.get(str(i), {})]
        if missing:
            raise UserError(f"--offline {self.path}: image id {missing[0][0]} (flip {missing[0][1]}) and "
                            f"{len(missing) - 1} more entries are not in the store; dump this dataset first")

    def records(self, image_ids, flips):
        out = np.empty(len(image_ids), self.layout)
        for row, (image_id, flip) in enumerate(zip(image_ids, flips)):
            entry = self.index.get(str(image_id), {}).get(str(int(flip)))
            if entry is None:
                raise UserError(f"--offline {self.path}: image id {image_id} (flip {int(flip)}) is not in the store; "
                                f"dump this dataset first")
            shard, slot, crc = entry
            record = self.shard(shard)[slot]
            if zlib.crc32(record.tobytes()) != crc:
                raise UserError(f"--offline {self.path}: shard {self.manifest['shards'][shard]['file']} is corrupt "
                                f"(record of image {image_id} fails its CRC); dump the store again")
            out[row] = record
        return out

    def shard(self, k):
        if k not in self.shards:
            self.shards[k] = np.memmap(os.path.join(self.path, self.manifest["shards"][k]["file"]), dtype=self.layout,
                                       mode="r")
        return self.shards[k]

    def knowledge(self, targets, padded_hw, device):
        """The stored Knowledge of a batch, picked by each target's image_id and flip state."""
        records = self.records([t["image_id"] for t in targets], [t.get("flipped", False) for t in targets])
        return records_to_knowledge(records, self.dtype, padded_hw, device)


class FixedFlip(torch.utils.data.Dataset):
    """A training set's images with the flip fixed (the dump visits every image in each stored flip state)."""

    def __init__(self, dataset, indices, flip):
        self.dataset, self.indices, self.flip = dataset, indices, flip

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset.load(self.indices[i], self.flip)


def fitnet_bytes(features, targets, element_bytes):
    """What FitNet would store for these images: the teacher's 4 levels, whole and at foreground cells only."""
    full = sum(f[0].numel() for f in features) * element_bytes
    fg = [sum(int(unikd.foreground_mask([t], f.shape[-2], f.shape[-1], f.device).sum()) * f.shape[1]
              for f in features) * element_bytes for t in targets]
    return full, fg


def coco_fitnet_bytes(d_model, element_bytes, fg_fraction):
    """FitNet's per-image bytes projected to COCO at 800x1333 (padded to 64 as detectors.py does)."""
    h, w = (math.ceil(s / 64) * 64 for s in COCO_SIZE)
    cells = sum(math.ceil(h / s) * math.ceil(w / s) for s in (8, 16, 32, 64))
    return cells * d_model * element_bytes, cells * d_model * element_bytes * fg_fraction


def write_store_index(partial, params, num_shards, layout, element_bytes):
    """Merges the shards' own JSON into index.json and writes manifest.json (deterministic: no clocks)."""
    index, shard_list, full, fg, measured = {}, [], 0, 0, 0
    for k in range(num_shards):
        with open(os.path.join(partial, f"shard_{k:05d}.json")) as f:
            part = json.load(f)
        for slot, (image_id, flip, crc) in enumerate(part["entries"]):
            index.setdefault(str(image_id), {})[str(flip)] = [k, slot, crc]
        shard_list.append({"file": f"shard_{k:05d}.bin", "records": len(part["entries"])})
        full, fg, measured = full + part["fitnet_full_bytes"], fg + part["fitnet_fg_bytes"], \
            measured + part["entries_measured"]
    flips = len(params["flips"])
    per_image = layout.itemsize * flips
    full_pi, fg_pi = full / measured * flips, fg / measured * flips
    coco_full, coco_fg = coco_fitnet_bytes(params["d_model"], element_bytes, fg / max(full, 1))
    storage = {"record_bytes": layout.itemsize, "bytes_per_image": per_image,
               "fitnet_full_bytes_per_image": full_pi, "fitnet_fg_bytes_per_image": fg_pi,
               "ratio_full": full_pi / per_image, "ratio_fg": fg_pi / per_image,
               "coco_unikd_bytes": per_image * COCO_TRAIN_IMAGES,
               "coco_fitnet_full_bytes": coco_full * flips * COCO_TRAIN_IMAGES,
               "coco_fitnet_fg_bytes": coco_fg * flips * COCO_TRAIN_IMAGES,
               "coco_ratio_full": coco_full / layout.itemsize, "coco_fg_fraction_assumed": fg / max(full, 1)}
    manifest = dict(params, kind=STORE_KIND, version=STORE_VERSION, num_images=len(index),
                    image_ids=sorted(int(i) for i in index), layout=[[n, str(layout[n])] for n in layout.names],
                    shards=shard_list, storage=storage)
    with open(os.path.join(partial, "index.json"), "w") as f:
        json.dump(index, f)
    atomic_write_json(os.path.join(partial, "manifest.json"), manifest)
    return manifest


def dump_params(ake_file, ake_path, image_ids, flips, dtype, shard_images, batch_size, seed, min_size, max_size):
    """What makes two dumps the same dump (a resumed one must match it)."""
    return {"teacher": ake_file["teacher"], "teacher_weights": str(ake_file["teacher_weights"]),
            "teacher_weights_id": weights_id(ake_file["teacher_weights"]), "ake": os.path.abspath(ake_path),
            "ake_sha256": file_sha256(ake_path), "num_queries": ake_file["config"]["num_queries"],
            "d_model": ake_file["config"]["d_model"], "dtype": dtype, "flips": flips, "shard_images": shard_images,
            "batch_size": batch_size, "seed": seed, "min_size": min_size, "max_size": max_size,
            "image_ids_sha256": hashlib.sha256(json.dumps(image_ids).encode()).hexdigest()}


class StoreWriter:
    """Writes a store into <path>.partial/, shard by shard, and renames it to path when every shard is there."""

    def __init__(self, path, params):
        self.path, self.partial, self.params = path, path + ".partial", params
        self.layout = record_layout(params["num_queries"], params["d_model"], params["dtype"])

    def resuming(self):
        """True when an unfinished dump of the same settings is there to continue; refuses a finished store at
        path, or an unfinished one of other settings."""
        if os.path.exists(self.path):
            finished = os.path.isfile(os.path.join(self.path, "manifest.json"))
            raise UserError(f"{self.path} exists{' (a finished store)' if finished else ''}; pass --output-dir to "
                            f"dump another one")
        params_file = os.path.join(self.partial, "params.json")
        if not os.path.isfile(params_file):
            return False
        with open(params_file) as f:
            if json.load(f) != self.params:
                raise UserError(f"{self.partial} is an unfinished dump with other settings (AKE, teacher, dtype, "
                                f"flips, shards, batch, seed, sizes or images); delete it or pass another --output-dir")
        return True

    def start(self):
        os.makedirs(self.partial, exist_ok=True)
        atomic_write_json(os.path.join(self.partial, "params.json"), self.params)

    def has_shard(self, k):
        return os.path.isfile(os.path.join(self.partial, f"shard_{k:05d}.json"))

    def write_shard(self, k, records, fitnet_full, fitnet_fg):
        """The shard's records (.bin), then its entries with their CRCs (.json, which marks it complete)."""
        name = os.path.join(self.partial, f"shard_{k:05d}")
        atomic_write(name + ".bin", records.tofile)
        entries = [[int(r["image_id"]), int(r["flip"]), zlib.crc32(r.tobytes())] for r in records]
        atomic_write_json(name + ".json", {"entries": entries, "fitnet_full_bytes": sum(fitnet_full),
                                           "fitnet_fg_bytes": sum(fitnet_fg), "entries_measured": len(fitnet_full)},
                          indent=None)

    def finish(self, num_shards):
        """index.json + manifest.json, then the rename -> the manifest."""
        element_bytes = DUMP_DTYPES[self.params["dtype"]].itemsize
        manifest = write_store_index(self.partial, self.params, num_shards, self.layout, element_bytes)
        os.replace(self.partial, self.path)
        return manifest
