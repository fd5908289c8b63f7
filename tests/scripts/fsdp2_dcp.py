"""`python fsdp2_dcp.py OUT PORT`: two ranks (gloo) train trainers.MLP under FSDP2 (`fully_shard`) 3 steps
with AdamWScheduleFree and `dcp.save` {"model", "optim"} to OUT; OUT/../expected.pt is the optimizer's own
eval() gathered as a full state dict."""
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: trainers.py

def work(rank, world, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import schedulefree, trainers
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = trainers.MLP(width=16)
    fully_shard(model.fc1); fully_shard(model.fc2); fully_shard(model)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.02)
    opt.train()
    for _ in range(3):
        torch.manual_seed(rank)
        opt.zero_grad(); model(torch.randn(4, 8)).pow(2).mean().backward(); opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=out)
    opt.eval()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(out, "..", "expected.pt"))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
