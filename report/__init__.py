"""Seeing a plan: an HTML report, timelines, Model Explorer overlays, sweeps and figures.

    views      what a report shows, read off a Plan: candidates and why each lost, time and memory parts
    html, svg  one self-contained HTML file per plan or pair of phases (`write_html`), its drawings
    phases     prefill and decode planned together, with the KV-cache redistribution between them
    trace      a predicted timeline (Chrome trace events, opened by Perfetto), checked
    measure    measured timelines of real ranks (torch.profiler), merged with the predicted one by rank
    explorer   Model Explorer graphs and node-data overlays (the `explorer` extra)
    engine     `shardwise.plan` for presets with what repeats across calls cached (prototypes, meshes)
    sweep      models × chips × batches × phases × weights × objectives → a table (CSV, JSON)
    figures    the paper's Figure 1, the layout map and the time breakdown, drawn with matplotlib

This floor sits under the command line and above the public API: it reads Plans and the planner's
own records, and never changes how a plan is made.
"""
