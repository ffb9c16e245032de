package ferry

import org.apache.spark.ml.Transformer
import org.apache.spark.ml.param.{IntParam, Param, ParamMap, Params}
import org.apache.spark.ml.util.{DefaultParamsReadable, DefaultParamsWritable, Identifiable}
import org.apache.spark.sql.{DataFrame, Dataset}
import org.apache.spark.sql.types.StructType

/** Params of [[TileReconstruct]]; they mean what the `tiles_emit` / `tiles_reduce` stages' params mean. */
trait TileReconstructParams extends Params {

  /** Operator: threshold_sum, convolve2d, median, or one registered on the workers (required). */
  final val operator: Param[String] = new Param[String](this, "operator",
    "operator: threshold_sum, convolve2d, median, or one registered on the workers (required)",
    (s: String) => s != null && s.nonEmpty)

  /** JSON object of the operator's params, e.g. {"kernel": [[...]]} or {"size": 3}. Default {}. */
  final val operatorParams: Param[String] = new Param[String](this, "operatorParams",
    "JSON object of the operator's params, e.g. {\"kernel\": [[1, 2], [3, 4]]} or {\"size\": 3} (default {})",
    (s: String) => Json.isObject(s))

  /**
   * scatter (sum of partials; linear operators), gather (halo regions) or auto (default: gather,
   * or scatter for a linear operator whose halo region is over twice the tile, as threshold_sum's).
   */
  final val strategy: Param[String] = new Param[String](this, "strategy",
    "scatter (sum of partials; linear operators), gather (halo regions) or auto (default: gather, or scatter for a linear operator whose halo region is over twice the tile, as threshold_sum's)",
    (s: String) => TileReconstruct.Strategies.contains(s))

  /** Neighbourhood radius in tiles; -1 (default) = the operator's own. */
  final val radius: IntParam = new IntParam(this, "radius",
    "neighbourhood radius in tiles; -1 (default) = the operator's own", (v: Int) => v >= -1)

  /**
   * Tile size; -1 (default) = row by row from the tile_height / tile_width columns (a tile store
   * has them). Given here, a kernel larger than the tile fails in `transform`; from the columns, in
   * the job's first task.
   */
  final val tileHeight: IntParam = new IntParam(this, "tileHeight", "tile rows; -1 = from the data", (v: Int) => v >= -1)
  final val tileWidth: IntParam = new IntParam(this, "tileWidth", "tile columns; -1 = from the data", (v: Int) => v >= -1)

  /** Image size; -1 (default) = from the image_height / image_width columns. */
  final val imageHeight: IntParam = new IntParam(this, "imageHeight", "image rows; -1 = from the data",
    (v: Int) => v >= -1)
  final val imageWidth: IntParam = new IntParam(this, "imageWidth", "image columns; -1 = from the data",
    (v: Int) => v >= -1)

  /**
   * scatter: MB of integer partial sums each emit task may hold, to send one row per target instead
   * of one per (source, target); 0 = off, -1 (default) = the stage's default.
   */
  final val combineMb: IntParam = new IntParam(this, "combineMb",
    "scatter: MB of integer partial sums each emit task may hold; 0 = off, -1 (default) = the stage's default",
    (v: Int) => v >= -1)

  /**
   * Output tiles' dtype: "operator" (default: the operator's own, e.g. int64 for threshold_sum on
   * int16 tiles), an integer dtype for integer results (every value must fit, else the task fails
   * naming the tile), or float32 (rounded) / float64 for float results.
   */
  final val outputDtype: Param[String] = new Param[String](this, "outputDtype",
    "output tiles' dtype: operator (default; the operator's own), " +
      TileReconstruct.OutputDtypes.filter(_ != "operator").mkString(", ") +
      " (integer results: every value must fit; float results: float32 or float64)",
    (s: String) => TileReconstruct.OutputDtypes.contains(s))

  setDefault(operatorParams -> "{}", strategy -> "auto", radius -> -1, tileHeight -> -1, tileWidth -> -1,
    imageHeight -> -1, imageWidth -> -1, combineMb -> -1, outputDtype -> "operator")
}

/**
 * Tiled image reconstruction over a DataFrame of tiles (a ferry tile store read as Parquet:
 * `image_id, z, x, y, pixels` as .npy bytes, plus `image_height, image_width, tile_height,
 * tile_width` columns or the matching params). Each source tile is read once by the `tiles_emit`
 * stage, which sends its partial (linear operators) or its piece of each neighbour's halo region
 * to every target within the radius (integer partials of one task bound for the same target
 * travel as one sum, see `combineMb`); the rows are shuffled by target and each target's rows go
 * through `tiles_reduce` as one group. The output has one row per output tile:
 * `image_id, z, x, y, pixels` (.npy). Missing neighbours count as zeros.
 *
 * {{{
 *   val out = new TileReconstruct().setOperator("convolve2d").setKernel(k).transform(spark.read.parquet(store))
 * }}}
 */
class TileReconstruct(override val uid: String) extends Transformer with TileReconstructParams
  with DefaultParamsWritable {

  def this() = this(Identifiable.randomUID("tileReconstruct"))

  def setOperator(value: String): this.type = set(operator, value)
  def setOperatorParams(value: String): this.type = set(operatorParams, value)
  def setStrategy(value: String): this.type = set(strategy, value)
  def setRadius(value: Int): this.type = set(radius, value)
  def setTileSize(height: Int, width: Int): this.type = set(tileHeight, height).set(tileWidth, width)
  def setImageSize(height: Int, width: Int): this.type = set(imageHeight, height).set(imageWidth, width)
  def setCombineMb(value: Int): this.type = set(combineMb, value)
  def setOutputDtype(value: String): this.type = set(outputDtype, value)

  /** The convolution kernel of operator convolve2d (rows of taps). */
  def setKernel(kernel: Array[Array[Double]]): this.type =
    set(operatorParams, Json.encode(Map("kernel" -> kernel.map(_.toSeq).toSeq)))

  private def stageParams(): String = Json.encode(Map(
    "operator" -> $(operator), "operator_params" -> Json.decodeObject($(operatorParams)),
    "strategy" -> $(strategy), "radius" -> $(radius), "tile_height" -> $(tileHeight), "tile_width" -> $(tileWidth),
    "image_height" -> $(imageHeight), "image_width" -> $(imageWidth), "output_dtype" -> $(outputDtype)) ++
    (if ($(combineMb) >= 0) Map("combine_mb" -> $(combineMb)) else Map.empty))

  private def inputCols(schema: StructType): Seq[String] =
    TileReconstruct.TileColumns ++ TileReconstruct.GeometryColumns.filter(schema.fieldNames.contains)

  private def checkOperator(): Unit = if (!isDefined(operator)) {
    throw new InvalidParamsException(TileReconstruct.Emit, "TileReconstruct needs an operator: setOperator(" +
      "\"convolve2d\" | \"median\" | \"threshold_sum\" | a registered one).")
  }

  private def checkColumns(schema: StructType): Unit = {
    val missing = TileReconstruct.TileColumns.filterNot(schema.fieldNames.contains)
    if (missing.nonEmpty) {
      throw new SchemaMismatchException(TileReconstruct.Emit, s"TileReconstruct needs the tile columns " +
        s"${missing.mkString(", ")}; the DataFrame has ${schema.fieldNames.mkString(", ")}. Read a ferry tile " +
        "store, or give image_id, z, x, y and pixels (.npy bytes).")
    }
  }

  /** The worker's checks of both stages for these columns and params: (emit's output, the result). */
  private def describe(pool: WorkerPool, schema: StructType, params: String): (StructType, StructType) = {
    val emitted = pool.withClient(_.describe(TileReconstruct.Emit, params,
      Some(StructType(inputCols(schema).map(schema(_)))))).outputSchema.get
    (emitted, pool.withClient(_.describe(TileReconstruct.Reduce, params, Some(emitted))).outputSchema.get)
  }

  override def transformSchema(schema: StructType): StructType = {
    checkOperator()
    checkColumns(schema)
    checkTileSize(schema)
    describe(WorkerPool.get(PythonStage.activeConf), schema, stageParams())._2
  }

  /**
   * The tile size comes from the params, or row by row from the tile_height / tile_width columns
   * (each emitted row carries it on to the reduce): no job reads them up front, and images of one
   * DataFrame may have different tile sizes.
   */
  private def checkTileSize(schema: StructType): Unit = {
    if (($(tileHeight) < 1 || $(tileWidth) < 1) && !Seq("tile_height", "tile_width").forall(schema.fieldNames.contains)) {
      throw new InvalidParamsException(TileReconstruct.Emit, "TileReconstruct needs the tile size: call " +
        "setTileSize(height, width) or give tile_height and tile_width columns (a tile store has them).")
    }
  }

  override def transform(dataset: Dataset[_]): DataFrame = {
    checkOperator()
    checkColumns(dataset.schema)
    checkTileSize(dataset.schema)
    val conf = FerryConf.get(dataset.sparkSession)
    // The workers (their start takes about a second, cold) come up while the query is planned.
    WorkerPool.prestartLocal(dataset.sparkSession, conf, dataset.sparkSession.sparkContext.defaultParallelism)
    val params = stageParams()
    val cols = inputCols(dataset.schema)
    val (emitSchema, outSchema) = describe(WorkerPool.get(conf), dataset.schema, params)
    val reads = dataset.sparkSession.sparkContext.longAccumulator("ferry source tiles read")
    sourceReads = Some(reads)
    val emitted = PythonStage.execute(dataset, TileReconstruct.Emit, params, cols, emitSchema, rowsIn = Some(reads))
    PythonStage.executeGrouped(emitted, TileReconstruct.Reduce, params, emitSchema.fieldNames.toSeq,
      TileReconstruct.TileColumns.take(4), outSchema)
  }

  @transient private var sourceReads: Option[org.apache.spark.util.LongAccumulator] = None

  /**
   * Source tiles read by the jobs of the last `transform`'s output so far: one per tile when the
   * output is computed once (a repeated action or a retried task reads again).
   */
  def getSourceReads: Long = sourceReads.map(_.value.longValue).getOrElse(0L)

  override def copy(extra: ParamMap): TileReconstruct = defaultCopy(extra)
}

object TileReconstruct extends DefaultParamsReadable[TileReconstruct] {
  val Emit = "tiles_emit"
  val Reduce = "tiles_reduce"
  val TileColumns: Seq[String] = Seq("image_id", "z", "x", "y", "pixels")
  val GeometryColumns: Seq[String] = Seq("image_height", "image_width", "tile_height", "tile_width")
  // The values the setters accept, so a bad one fails where it is set. They are the stage
  // contract's choices (TileReconstructSuite compares them with the worker's Describe), which
  // checks them again whatever a JVM caller sends.
  /** Values of `strategy`: the stage contract's `strategy` choices. */
  val Strategies: Seq[String] = Seq("auto", "scatter", "gather")
  /** Values of `outputDtype`: the stage contract's `output_dtype` choices. */
  val OutputDtypes: Seq[String] = Seq("operator", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
    "uint64", "float32", "float64")

  override def load(path: String): TileReconstruct = super.load(path)
}
