"""Images/s of undiffuse's DDIM and DDPM loops against diffusers' DDIMPipeline / DDPMPipeline,
driving the same UNet2DModel weights with the same number of steps, side by side in one run.

    python bench/sampler.py [--steps 20] [--batches 1,16,64] [--repeats 3] [--device cpu]
    python bench/sampler.py --device cuda --fast   # + bf16, channels_last, torch.compile

Prints one row per (sampler, batch): images/s of each and the ratio ours/diffusers (> 1 is
faster). With --fast it also reports the largest pixel difference from the fp32 images.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch

from undiffuse import DDIMSampler, DDPMSampler, ImageNoise, NoiseSchedule
from undiffuse.images import to_uint8


def build_unet(device: torch.device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    # a CIFAR-10-shaped DDPM UNet, narrowed so that batch 64 runs on a 2-core CPU
    return (
        UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )
        .to(device)
        .eval()
    )


def time_it(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocator, compile)
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fast", action="store_true", help="bf16 + channels_last + torch.compile (GPU)")
    args = p.parse_args()

    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    device = torch.device(args.device)
    unet = build_unet(device)
    schedule = NoiseSchedule.linear()
    ddim_s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    ddpm_s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    pipes = {"ddim": DDIMPipeline(unet, ddim_s), "ddpm": DDPMPipeline(unet, ddpm_s)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    # our loop drives the same weights stored channels_last, as undiffuse.load_model does
    ours_net = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    fast_net = None
    if args.fast:
        fast_net = build_unet(device).to(memory_format=torch.channels_last)
        fast_net = torch.compile(fast_net, mode="max-autotune-no-cudagraphs")

    def ours(kind: str, n: int, net=ours_net, dtype=torch.float32):
        sampler = DDIMSampler(schedule, eta=0.0) if kind == "ddim" else DDPMSampler(schedule)

        def eps(x, t):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
                return net(x, t).sample.float()

        x = sampler.sample(
            eps, (3, 32, 32), steps=args.steps, noise=ImageNoise.for_request(0, n, device), device=device
        )
        return to_uint8(x)

    def theirs(kind: str, n: int):
        g = torch.Generator(device="cpu").manual_seed(0)
        kw = {"eta": 0.0} if kind == "ddim" else {}
        with torch.no_grad():
            return pipes[kind](batch_size=n, generator=g, num_inference_steps=args.steps, output_type="np", **kw)

    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    print(f"# UNet2DModel {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, 32x32x3, {args.steps} steps")
    header = "| sampler | batch | diffusers img/s | undiffuse img/s | ratio |"
    if args.fast:
        header += " fast img/s | fast ratio | max |Δpixel| |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with torch.no_grad():
        for kind in ("ddim", "ddpm"):
            for n in (int(b) for b in args.batches.split(",")):
                t_ref, _ = time_it(lambda k=kind, m=n: theirs(k, m), args.repeats)
                t_ours, ref_pixels = time_it(lambda k=kind, m=n: ours(k, m), args.repeats)
                row = f"| {kind} | {n} | {n / t_ref:.2f} | {n / t_ours:.2f} | {t_ref / t_ours:.2f}x |"
                if args.fast:
                    t_fast, fast_pixels = time_it(
                        lambda k=kind, m=n: ours(k, m, fast_net, torch.bfloat16), args.repeats
                    )
                    diff = (torch.from_numpy(fast_pixels).int() - torch.from_numpy(ref_pixels).int()).abs().max()
                    row += f" {n / t_fast:.2f} | {t_ref / t_fast:.2f}x | {int(diff)} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
