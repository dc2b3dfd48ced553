"""Development tools, run from the repository root and never shipped in the wheel:

    synthetic.py    the synthetic visual-prompt task (`python -m tools.synthetic`)
    tiny_vipllava/  the embedded tiny model's recipe: make.sh, its stage configs and
                    experiment.py (`python -m tools.tiny_vipllava.experiment`)
"""
