"""Plain SR networks trained on paired folders (``blindsr train srnet``): RRDBNet (Real-ESRNet) and SwinIR."""
