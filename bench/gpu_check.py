"""GPU path check of 03_train: finetune (AMP, EMA, grad accumulation, LLRD), frozen features on CUDA, resume.

    REVSD_WORKING=/tmp/gpuw python -c "from revsd import filtering as f, targets as t; \
        f.run(f.FilterConfig(exp='gpu', val_size=0.2, test_size=0.2)); t.run(t.TargetsConfig(exp='gpu', vocab_size=256))"
    REVSD_WORKING=/tmp/gpuw python bench/gpu_check.py          # on a machine with a GPU

Prints each run's seconds and val/test cosine, whether the interrupted-then-resumed run equals the
uninterrupted one, and that the predictor reloads. 3 epochs at lr 1e-4 are a path check, not a result.
"""

import json, time, torch
from revsd import inference, train
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0), "torch", torch.__version__)
base = dict(exp="gpu", mode="finetune", epochs=3, batch_size=32, lr=1e-4, dropout=0.1, hidden=256, ema=0.99,
            llrd=0.8, grad_accum=2, num_workers=8)
res = {}
for name, kw in [("ft_effnet", dict(backbone="effnet_lite0")),
                 ("ft_vit_tiny", dict(backbone="vit_b16", tiny=True, pretrained=False)),
                 ("frozen_effnet", dict(backbone="effnet_lite0", mode="frozen", epochs=20, dropout=0.8, ema=0.0))]:
    t = time.time()
    d = train.run(train.TrainConfig(**{**base, **kw, "run": name}))
    m = train.load_metrics(d)
    res[name] = dict(seconds=round(time.time() - t, 1), val=m["val_cosine"], test=m["test_cosine"], const=m["const_mean_test"])
    print(name, res[name], flush=True)
try:
    train.run(train.TrainConfig(**base, backbone="effnet_lite0", run="resumed", stop_after_epoch=2))
except train.Interrupted as e:
    print("interrupted:", e)
d = train.run(train.TrainConfig(**base, backbone="effnet_lite0", run="resumed"))
m = train.load_metrics(d)
print("resume equal to uninterrupted:", m["val_cosine"] == res["ft_effnet"]["val"], m["test_cosine"] == res["ft_effnet"]["test"], m["val_cosine"], res["ft_effnet"]["val"])
p = inference.load_predictor(d)
from PIL import Image
import glob
imgs = [Image.open(f).convert("RGB") for f in sorted(glob.glob("input/sample/images/part-000001/*.jpg"))[:8]]
e, pr = p.predict(imgs)
print("predictor", e.shape, None if pr is None else pr.shape)
print(json.dumps(res, indent=1))
