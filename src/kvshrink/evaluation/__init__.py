"""Evaluation: studies that run models. A task's problems through a cache policy (`evaluate`), majority
voting over W samples (`voting`), the hyper-scaling sweep over chain length L and votes W with its reports
(`sweep`), and KVTC's accuracy against baselines at the same ratios (`kvtc`).

Method code never imports this package; it imports the method.
"""
