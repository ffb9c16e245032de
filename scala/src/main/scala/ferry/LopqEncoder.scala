package ferry

import org.apache.spark.ml.Estimator
import org.apache.spark.ml.param.{BooleanParam, DoubleParam, IntParam, ParamMap}
import org.apache.spark.ml.util.{DefaultParamsReadable, DefaultParamsWritable, Identifiable}
import org.apache.spark.sql.Dataset
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions.GenericInternalRow
import org.apache.spark.sql.functions.{col, size}
import org.apache.spark.sql.types._
import org.slf4j.LoggerFactory

/** Params of [[LopqEncoder]]: those of the `lopq_train` stage, plus the driver's iteration control. */
trait LopqEncoderParams extends LopqModelParams {

  final val numCoarseClusters: IntParam = new IntParam(this, "numCoarseClusters",
    "coarse clusters per half (V; required)", (v: Int) => v >= 1)
  final val numSubquantizers: IntParam = new IntParam(this, "numSubquantizers",
    "subquantizers in total (M: even, dividing the dimension; required)", (v: Int) => v >= 1)
  final val subquantizerClusters: IntParam = new IntParam(this, "subquantizerClusters",
    "clusters per subquantizer (default 256: one byte per fine code)", (v: Int) => v >= 1)
  final val pca: BooleanParam = new BooleanParam(this, "pca",
    "rotate onto principal axes and balance the halves' variance first (default true)")
  final val pcaDim: IntParam = new IntParam(this, "pcaDim", "principal axes kept; 0 (default) keeps all",
    (v: Int) => v >= 0)
  final val seed: IntParam = new IntParam(this, "seed", "seed of sampling and k-means++ (default 0)", (v: Int) => v >= 0)
  final val initSample: IntParam = new IntParam(this, "initSample",
    "points sampled for k-means++; 0 (default) = 24 per cluster, at least 1024", (v: Int) => v >= 0)
  final val coarseIters: IntParam = new IntParam(this, "coarseIters", "Lloyd steps of the coarse k-means at most " +
    "(default 10)", (v: Int) => v >= 0)
  final val subIters: IntParam = new IntParam(this, "subIters", "Lloyd steps of the subquantizers over all the " +
    "data at most (default 4)", (v: Int) => v >= 0)
  final val rotationIters: IntParam = new IntParam(this, "rotationIters", "of the sampleIters and of the " +
    "subIters steps, the last ones that also refine the local rotations (orthogonal Procrustes; default 4 each; 0: " +
    "the reference's eigenvector rotations)", (v: Int) => v >= 0)
  final val sampleIters: IntParam = new IntParam(this, "sampleIters", "Lloyd steps of the subquantizers on the " +
    "k-means++ sample, in the sub_init aggregate, before the subIters steps; the last rotationIters of them also " +
    "refine the rotations (default 8)", (v: Int) => v >= 0)
  final val tol: DoubleParam = new DoubleParam(this, "tol", "stop the Lloyd steps when the inertia improves by " +
    "less than this fraction (default 1e-4)", (v: Double) => v >= 0)
  final val aggDepth: IntParam = new IntParam(this, "aggDepth", "depth of the tree aggregation of each pass's " +
    "partials (default 2, as the reference's --agg_depth)", (v: Int) => v >= 1)

  setDefault(subquantizerClusters -> 256, pca -> true, pcaDim -> 0, seed -> 0, initSample -> 0, coarseIters -> 10,
    subIters -> 4, rotationIters -> 4, sampleIters -> 8, tol -> 1e-4, aggDepth -> 2)
}

/**
 * Trains an LOPQ model on a DataFrame of vectors (`vectorCol`: array<float|double>) through the
 * workers' `lopq_train` reduce stage: every pass (PCA moments, k-means++ samples, Lloyd steps,
 * local rotations, subquantizers) is a chunk per partition, a tree of combines of depth
 * `aggDepth` (Spark's `treeReduce`), and an aggregate on the driver that yields the next
 * training state. The states (float64, so the model is `ferry.lopq.fit`'s up to summation order)
 * travel to the workers as content-addressed resources. Cache the input: every pass reads it.
 *
 * {{{
 *   val model = new LopqEncoder().setNumCoarseClusters(16).setNumSubquantizers(8).fit(vectors)
 *   val codes = model.transform(vectors)
 * }}}
 */
class LopqEncoder(override val uid: String) extends Estimator[LopqModel] with LopqEncoderParams
  with DefaultParamsWritable {

  def this() = this(Identifiable.randomUID("lopqEncoder"))

  def setVectorCol(value: String): this.type = set(vectorCol, value)
  def setIdCol(value: String): this.type = set(idCol, value)
  def setNumCoarseClusters(value: Int): this.type = set(numCoarseClusters, value)
  def setNumSubquantizers(value: Int): this.type = set(numSubquantizers, value)
  def setSubquantizerClusters(value: Int): this.type = set(subquantizerClusters, value)
  def setPca(value: Boolean): this.type = set(pca, value)
  def setPcaDim(value: Int): this.type = set(pcaDim, value)
  def setSeed(value: Int): this.type = set(seed, value)
  def setInitSample(value: Int): this.type = set(initSample, value)
  def setCoarseIters(value: Int): this.type = set(coarseIters, value)
  def setSubIters(value: Int): this.type = set(subIters, value)
  def setRotationIters(value: Int): this.type = set(rotationIters, value)
  def setSampleIters(value: Int): this.type = set(sampleIters, value)
  def setTol(value: Double): this.type = set(tol, value)
  def setAggDepth(value: Int): this.type = set(aggDepth, value)

  private def stageParams(dim: Int, step: String, phase: String, state: String): String = Json.encode(Map(
    "step" -> step, "phase" -> phase, "dim" -> dim, "V" -> $(numCoarseClusters), "M" -> $(numSubquantizers),
    "subquantizer_clusters" -> $(subquantizerClusters), "pca" -> $(pca), "pca_dim" -> $(pcaDim),
    "seed" -> $(seed), "init_sample" -> $(initSample), "sample_iters" -> $(sampleIters),
    "rotation_iters" -> $(rotationIters), "state" -> state,
    "vector_col" -> $(vectorCol)))

  private def required(): Unit = Seq(numCoarseClusters, numSubquantizers).foreach { p =>
    if (!isDefined(p)) {
      throw new InvalidParamsException(LopqEncoder.Stage, s"LopqEncoder needs ${p.name}: call set" +
        s"${p.name.capitalize}(...) (the reference's --${if (p == numCoarseClusters) "V" else "M"}).")
    }
  }

  private def vectorField(schema: StructType): StructField = {
    val f = schema.find(_.name == $(vectorCol)).getOrElse(throw new SchemaMismatchException(LopqEncoder.Stage,
      s"LopqEncoder's vector column '${$(vectorCol)}' does not exist; the DataFrame has " +
        s"${schema.fieldNames.mkString(", ")}. Set vectorCol."))
    f.dataType match {
      case ArrayType(FloatType | DoubleType, _) => f
      case other => throw new SchemaMismatchException(LopqEncoder.Stage, s"LopqEncoder's vector column " +
        s"'${f.name}' must be array<float> or array<double>, found ${other.simpleString}.")
    }
  }

  override def transformSchema(schema: StructType): StructType = {
    required()
    vectorField(schema)
    StructType(Seq(schema(getIdCol), StructField("coarse", ArrayType(IntegerType)),
      StructField("fine", ArrayType(IntegerType))))
  }

  override def fit(dataset: Dataset[_]): LopqModel = {
    required()
    val field = vectorField(dataset.schema)
    val spark = dataset.sparkSession
    val conf = FerryConf.get(spark)
    val vectors = dataset.select(col(s"`${field.name}`"))
    val dims = vectors.select(size(col(s"`${field.name}`")).as("d")).distinct().limit(3).collect().map(_.getInt(0))
    if (dims.isEmpty) throw new InvalidInputException(LopqEncoder.Stage, "LopqEncoder got no vectors to train on.")
    if (dims.length > 1) {
      throw new InvalidInputException(LopqEncoder.Stage, s"The vectors in '${field.name}' have different " +
        s"lengths (${dims.sorted.mkString(", ")}, ...); every vector needs the same dimension.")
    }
    val dim = dims.head
    // Every pass's params are checked by the stage before any data moves.
    WorkerPool.get(conf).withClient(_.describe(LopqEncoder.Stage, stageParams(dim, "pca", "chunk", ""),
      Some(StructType(Seq(field)))))
    val rows = vectors.queryExecution.toRdd
    val inSchema = StructType(Seq(field))
    val depth = $(aggDepth)
    var state = Array.empty[Byte] // the whole training state, float64 npz: what the next pass reads
    var model = Array.empty[Byte] // the state as a model file, once it is a complete model
    var inertia = Double.NaN
    var lastImproved = true

    def pass(step: String): Unit = {
      val t0 = System.nanoTime()
      val digest = if (state.isEmpty) "" else WorkerClient.sha256Hex(state)
      val resources = if (state.isEmpty) Seq.empty else Seq(state)
      val chunkParams = stageParams(dim, step, "chunk", digest)
      val combineParams = stageParams(dim, step, "combine", digest)
      val partials = rows.mapPartitions { part =>
        LopqEncoder.runOnce(conf, chunkParams, inSchema, part, resources).map(_.getBinary(0))
      }
      val combined = FerryException.unwrapping {
        partials.treeReduce((a, b) => LopqEncoder.combine(conf, combineParams, resources, a, b), depth)
      }
      val out = LopqEncoder.runOnce(conf, stageParams(dim, step, "aggregate", digest), LopqEncoder.PartialSchema,
        Iterator(LopqEncoder.partialRow(combined)), resources).toSeq
      state = out.head.getBinary(0)
      model = out.head.getBinary(2)
      val previous = inertia
      inertia = out.head.getDouble(1)
      LopqEncoder.log.info(f"LOPQ training: $step done in ${(System.nanoTime() - t0) / 1e9}%.2f s" +
        (if (step.endsWith("_step")) f", inertia $inertia%.6g" else ""))
      if (!step.endsWith("_step")) inertia = Double.NaN
      lastImproved = previous.isNaN || !(previous - inertia <= $(tol) * math.max(inertia, 1e-300))
    }

    // The passes ferry.lopq.fit runs, in its order, with its convergence test.
    if ($(pca)) pass("pca")
    pass("coarse_init")
    var i = 0
    while (i < $(coarseIters)) { pass("coarse_step"); i += 1; if (!lastImproved) i = $(coarseIters) }
    inertia = Double.NaN
    pass("rotations")
    pass("sub_init")
    // The last rotationIters of the subIters steps also refine the rotations; they run even when
    // the plain steps stopped early, and their early stop compares from their second step on.
    val refine = math.min($(rotationIters), $(subIters))
    i = 0
    while (i < $(subIters) - refine) { pass("sub_step"); i += 1; if (!lastImproved) i = $(subIters) - refine }
    i = 0
    while (i < refine) { pass("sub_rotation_step"); i += 1; if (i > 1 && !lastImproved) i = refine }
    if (model.isEmpty) throw new ProtocolException("The lopq_train stage's last aggregate returned no model.", null)
    copyValues(new LopqModel(Identifiable.randomUID("lopqModel"), model).setParent(this))
  }

  override def copy(extra: ParamMap): LopqEncoder = defaultCopy(extra)
}

object LopqEncoder extends DefaultParamsReadable[LopqEncoder] {

  private val log = LoggerFactory.getLogger(classOf[LopqEncoder])

  val Stage = "lopq_train"

  private val PartialSchema = StructType(Seq(StructField("partial", BinaryType, nullable = false)))

  private def partialRow(bytes: Array[Byte]): InternalRow = new GenericInternalRow(Array[Any](bytes))

  /** One Run of the reduce stage over `rows`; its (at most one) output row, copied. */
  private def runOnce(conf: FerryConf, params: String, schema: StructType, rows: Iterator[InternalRow],
      resources: Seq[Array[Byte]]): Iterator[InternalRow] = {
    val runner = new StageRunner(conf, Stage)
    try runner.stream(Stage, params, schema, rows, resources)((reader, msg) => reader.rows(msg)).toVector.iterator
    finally runner.close()
  }

  private def combine(conf: FerryConf, params: String, resources: Seq[Array[Byte]], a: Array[Byte],
      b: Array[Byte]): Array[Byte] =
    runOnce(conf, params, PartialSchema, Iterator(partialRow(a), partialRow(b)), resources).next().getBinary(0)

  override def load(path: String): LopqEncoder = super.load(path)
}
