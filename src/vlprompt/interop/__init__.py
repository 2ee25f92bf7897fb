"""Interoperability with the official repositories (CoOp, CoCoOp, KgCoOp, MaPLe, IVLP, VPT,
PromptSRC, COMMA, DPT): read their Dassl checkpoints and run folders safely, import them as
vlprompt run folders, and export vlprompt runs as fixed classifier heads or official-layout
checkpoints.

Each method declares its official layout next to itself (``Method.official_layout``, an
``OfficialLayout`` from ``interop/layout.py``); this package holds the machinery that reads it.
This ``__init__`` imports nothing, so method modules can import ``interop.layout`` cheaply.
"""
