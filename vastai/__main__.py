from utils import run_main
from vastai.box import main

run_main(main)
