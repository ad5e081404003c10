"""One msrun worker of tests/test_parallel.py: loads each checkpoint split over the launch's ranks and saves
(rank 0) the logits and greedy ids of every prepared input; every rank saves its memory plan and parameter count.

    msrun ... tests/parallel_worker.py OUT_DIR SPECS_JSON
SPECS_JSON: [{"name", "folder", "tp", "ep", "adapter"?, "grad"?, "train"?}]; with "adapter" (a PEFT folder), the
greedy case again after model.load_adapter; with "train" (a list of {"name", "n", ...trainer keys}), LoRA fine-tuning
under this layout, the trainer called in-process as finetune.py runs it (tests/finetune_dp_worker.py's samples and
keys), into OUT_DIR/train/<spec>/<name>, rank 0 saving its losses. Inputs come from OUT_DIR/inputs/*.npz.
"""
import glob
import json
import os
import sys

import numpy as np

GREEDY_CASE = "padded_batch"   # greedy decoding on one case (a launch is slow): an image row and a text row


def training_grad(m, inputs):
    """(loss, d loss / d input embeddings) of the training forward, flattened: through every split layer's
    backward and the vocab-parallel head."""
    import mindspore as ms
    from glm4v_ms.finetune import forward
    ids = inputs["input_ids"]
    labels = ids.copy()
    labels[:, :3] = -100
    st = forward.prepare(m, ids, inputs["attention_mask"], labels)
    head = forward.VocabParallelHead(m.layout) if m.layout.world > 1 else None

    def fn(h, cos, sin, seen, rows, targets, weight):
        return forward.loss_sum(m, h, cos, sin, seen, rows, targets, weight, head=head)
    loss, dh = ms.jit(ms.value_and_grad(fn, 0))(st.h, st.cos, st.sin, st.seen, st.rows, st.targets, st.weight)
    mean = m(**inputs, labels=labels).loss.asnumpy().reshape(1)   # model(..., labels=).loss: the whole vocabulary
    return np.concatenate([loss.asnumpy().reshape(1), mean, dh.asnumpy().reshape(-1)])


def main(out, specs):
    from glm4v_ms import AutoModelForImageTextToText
    from glm4v_ms import attention
    cases = {os.path.basename(p)[:-4]: dict(np.load(p)) for p in sorted(glob.glob(os.path.join(out, "inputs", "*.npz")))}
    for spec in json.loads(specs):
        m = AutoModelForImageTextToText.from_pretrained(spec["folder"], tensor_parallel_size=spec["tp"],
                                                        expert_parallel=spec["ep"])
        r = m.layout.rank
        n = sum(int(np.prod(p.shape)) for _, p in m.parameters_and_names())
        with open(os.path.join(out, f"{spec['name']}.rank{r}.json"), "w") as f:
            json.dump({"plan": m.memory_plan(1024), "params": n, "kv_heads": m.text.kv_heads,
                       "kernels": attention.mode()}, f)
        for case, inputs in cases.items():
            logits = m(**inputs).logits.asnumpy()
            if r == 0:
                np.save(os.path.join(out, f"{spec['name']}.{case}.logits.npy"), logits)
            if case == GREEDY_CASE:
                ids = m.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
                if r == 0:
                    np.save(os.path.join(out, f"{spec['name']}.{case}.ids.npy"), ids)
            if case == "text":   # sampling with no seed given: every rank must draw the same tokens
                sampled = m.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=20)
                np.save(os.path.join(out, f"{spec['name']}.{case}.sampled.rank{r}.npy"), sampled)
        if spec.get("grad"):   # the training backward (finetune/forward.py) on the text case: d loss / d embeddings
            np.save(os.path.join(out, f"{spec['name']}.grad.rank{r}.npy"), training_grad(m, cases["text"]))
        if spec.get("adapter"):
            m.load_adapter(spec["adapter"])
            inputs = cases[GREEDY_CASE]
            logits = m(**inputs).logits.asnumpy()
            ids = m.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            if r == 0:
                np.save(os.path.join(out, f"{spec['name']}.{GREEDY_CASE}.adapter.logits.npy"), logits)
                np.save(os.path.join(out, f"{spec['name']}.{GREEDY_CASE}.adapter.ids.npy"), ids)
        for run in spec.get("train", []):
            train(out, spec, dict(run))
    print(f"rank {r}: done", flush=True)


def train(out, spec, run):
    """trainer.run with tensor_parallel_size / expert_parallel (the model loaded by the trainer, split like m)."""
    import finetune_dp_worker as dp
    name, n = run.pop("name"), run.pop("n")
    folder = os.path.join(out, "train", spec["name"])
    if str(run.get("resume_from_checkpoint", "")).startswith("@"):   # a checkpoint of an earlier run
        run["resume_from_checkpoint"] = os.path.join(folder, run["resume_from_checkpoint"][1:])
    tr, losses = dp.run(dp.args(os.path.join(folder, name), spec["folder"], tensor_parallel_size=spec["tp"],
                                expert_parallel=spec["ep"], **run), n)
    if tr.world.rank == 0:
        with open(os.path.join(folder, f"{name}.losses.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
