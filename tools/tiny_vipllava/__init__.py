"""The embedded tiny VipLlava's recipe (make.sh and its stage configs) and experiments."""
